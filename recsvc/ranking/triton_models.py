"""Model control of Triton's EXPLICIT mode: readiness, loading, and pinning the set of versions loaded.

What the version follower (recsvc/versions.py), the rollout (recsvc/repository/rollout.py) and
``recsvc triton-sync`` drive; inference is TritonRanker's job. Both share a TritonChannel.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from google.protobuf import json_format, text_format
from tritonclient.grpc import model_config_pb2

from recsvc.config import Settings
from recsvc.ranking.triton_channel import TritonChannel, TritonTls, is_client_error

__all__ = ["TritonModels"]


class TritonModels:
    """Control of the Triton model ``model_name``: which versions are loaded, and readiness.

    ``channel`` is a shared TritonChannel, or a URL for a channel of its own (closed with this object).
    Readiness and index calls get ``timeout_s``; loads, which return when loading has finished,
    ``load_timeout_s``.
    """

    def __init__(
        self,
        channel: TritonChannel | str,
        *,
        model_name: str = "ranker",
        timeout_s: float = 1.0,
        load_timeout_s: float = 120.0,
        tls: TritonTls | None = None,
    ) -> None:
        if timeout_s <= 0 or load_timeout_s <= 0:
            raise ValueError("timeout_s and load_timeout_s must be > 0")
        self._owns_channel = isinstance(channel, str)
        self.channel = TritonChannel(channel, tls=tls) if isinstance(channel, str) else channel
        self.model_name = model_name
        self.timeout_s = timeout_s
        self.load_timeout_s = load_timeout_s

    @classmethod
    def from_settings(
        cls, settings: Settings, *, timeout_s: float | None = None, channel: TritonChannel | None = None
    ) -> TritonModels:
        """Model control as the service uses it, from the ``triton_*`` settings."""
        models = cls(channel or TritonChannel.from_settings(settings), model_name=settings.triton_model,
                     timeout_s=settings.triton_timeout_s if timeout_s is None else timeout_s)  # fmt: skip
        models._owns_channel = channel is None
        return models

    async def is_server_ready(self) -> bool:
        """Whether Triton answers and reports ready (False when it cannot be reached)."""
        try:
            return bool(await self.channel.client().is_server_ready(client_timeout=self.timeout_s))
        except Exception as exc:
            if not is_client_error(exc):
                raise
            return False

    async def is_model_ready(self, version: str = "") -> bool:
        """Whether ``version`` of the model is loaded and ready ("" asks about the default version).

        A version Triton does not know is simply not ready; an unreachable Triton raises
        ``RankerUnavailable`` so callers can tell "not loaded" from "down".
        """
        try:
            ready = await self.channel.client().is_model_ready(self.model_name, version, client_timeout=self.timeout_s)
        except Exception as exc:
            if not is_client_error(exc):
                raise
            what = f"model {self.model_name} version {version or '(default)'} readiness"
            raise self.channel.error(what, exc) from exc
        return bool(ready)

    async def load_model(self, name: str | None = None) -> None:
        """Load (or reload) a model in Triton's explicit model-control mode.

        Triton rescans the model's directory and loads the versions its version policy selects; the
        call returns when loading has finished, so it gets ``load_timeout_s`` rather than the
        inference timeout.
        """
        name = name or self.model_name
        try:
            await self.channel.client().load_model(name, client_timeout=self.load_timeout_s)
        except Exception as exc:
            if not is_client_error(exc):
                raise
            raise self.channel.error(f"load of model {name}", exc) from exc

    async def loaded_versions(self) -> set[int]:
        """Versions of the model Triton holds READY now (from its repository index)."""
        try:
            index: Any = await self.channel.client().get_model_repository_index(client_timeout=self.timeout_s)
        except Exception as exc:
            if not is_client_error(exc):
                raise
            raise self.channel.error("repository index", exc) from exc
        return {int(m.version) for m in index.models
                if m.name == self.model_name and m.state == "READY" and m.version.isdigit()}  # fmt: skip

    async def load_versions(self, versions: Sequence[int], config_pbtxt: str) -> None:
        """Make exactly ``versions`` of the model loaded (EXPLICIT mode), whatever the file's version policy.

        Triton's load API takes a whole model config as an override: the repository's config.pbtxt with
        ``version_policy { specific { versions: [...] } }``. Versions already loaded and still listed
        keep serving while the others load or unload (checked against Triton 2.51: zero failed requests
        on the listed versions during such a reload).
        """
        config = text_format.Parse(config_pbtxt, model_config_pb2.ModelConfig())
        config.version_policy.specific.versions[:] = sorted(set(versions))
        override = json_format.MessageToJson(config, preserving_proto_field_name=True)
        what = f"load of {self.model_name} versions {sorted(set(versions))}"
        try:
            await self.channel.client().load_model(self.model_name, config=override, client_timeout=self.load_timeout_s)
        except Exception as exc:
            if not is_client_error(exc):
                raise
            raise self.channel.error(what, exc) from exc

    async def close(self) -> None:
        """Close the channel when it is this object's own (a shared one is closed by its owner)."""
        if self._owns_channel:
            await self.channel.close()
