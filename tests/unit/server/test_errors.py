from __future__ import annotations

import grpc
import pytest

from recsvc import errors
from recsvc.server.errors import status_code_for


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (errors.InvalidArgument("k", "bad"), grpc.StatusCode.INVALID_ARGUMENT),
        (errors.NotFound("x"), grpc.StatusCode.NOT_FOUND),
        (errors.ConfigError("x"), grpc.StatusCode.FAILED_PRECONDITION),
        (errors.BundleError("x"), grpc.StatusCode.FAILED_PRECONDITION),
        (errors.RankerUnavailable("x"), grpc.StatusCode.UNAVAILABLE),
        (errors.StoreUnavailable("x"), grpc.StatusCode.UNAVAILABLE),
        (errors.DeadlineExceeded("x"), grpc.StatusCode.DEADLINE_EXCEEDED),
        (errors.RecsvcError("x"), grpc.StatusCode.INTERNAL),
    ],
)
def test_every_error_maps_to_a_code(exc: errors.RecsvcError, code: grpc.StatusCode) -> None:
    assert status_code_for(exc) == code


def test_every_exported_error_is_mapped_deliberately() -> None:
    exported = [getattr(errors, n) for n in errors.__all__]
    unmapped = [e.__name__ for e in exported if e is not errors.RecsvcError
                and status_code_for(e("f", "m") if e is errors.InvalidArgument else e("m")) == grpc.StatusCode.INTERNAL]
    assert unmapped == []
