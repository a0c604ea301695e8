{{/*
Names. Object names are DNS labels (63 characters at most). fullname is cut to 40 so that suffixed
names stay valid too: a StatefulSet "<fullname>-redis" also names its pods and its controller-revision-hash
label ("<name>-<10-char hash>"), and the publish Job adds "-publish-<hash>" plus a pod suffix.
*/}}
{{- define "recsvc.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "recsvc.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "recsvc.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels. selectorLabels never change over a release's life (Deployment selectors are immutable);
a component label tells the pods of one release apart.
*/}}
{{- define "recsvc.selectorLabels" -}}
app.kubernetes.io/name: {{ include "recsvc.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "recsvc.labels" -}}
helm.sh/chart: {{ include "recsvc.chart" . }}
{{ include "recsvc.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: recsvc
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Usage: include "recsvc.componentSelectorLabels" (list $ "server") */}}
{{- define "recsvc.componentSelectorLabels" -}}
{{ include "recsvc.selectorLabels" (index . 0) }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end }}

{{- define "recsvc.componentLabels" -}}
{{ include "recsvc.labels" (index . 0) }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end }}

{{- define "recsvc.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "recsvc.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Image references: a digest pins harder than a tag. Usage: include "recsvc.imageRef" .image */}}
{{- define "recsvc.imageRef" -}}
{{- if .digest }}
{{- printf "%s@%s" .repository .digest }}
{{- else }}
{{- printf "%s:%s" .repository (toString .tag) }}
{{- end }}
{{- end }}

{{- define "recsvc.image" -}}
{{- $img := .Values.image }}
{{- include "recsvc.imageRef" (dict "repository" $img.repository "tag" (default .Chart.AppVersion $img.tag) "digest" $img.digest) }}
{{- end }}

{{/* The server pod's image: the lean serving image (Dockerfile --target serving) when image.serving names
     one, else the full image. */}}
{{- define "recsvc.servingImage" -}}
{{- $img := .Values.image.serving }}
{{- if $img.repository }}
{{- include "recsvc.imageRef" (dict "repository" $img.repository "tag" (default .Chart.AppVersion $img.tag) "digest" $img.digest) }}
{{- else }}
{{- include "recsvc.image" . }}
{{- end }}
{{- end }}

{{/* Object names of the parts. */}}
{{- define "recsvc.tritonName" -}}{{ include "recsvc.fullname" . }}-triton{{- end }}
{{- define "recsvc.tritonAdminName" -}}{{ include "recsvc.fullname" . }}-triton-admin{{- end }}
{{- define "recsvc.redisName" -}}{{ include "recsvc.fullname" . }}-redis{{- end }}
{{- define "recsvc.scriptsName" -}}{{ include "recsvc.fullname" . }}-scripts{{- end }}
{{- define "recsvc.denyListName" -}}{{ include "recsvc.fullname" . }}-deny-list{{- end }}

{{- define "recsvc.modelsClaimName" -}}
{{- default (printf "%s-models" (include "recsvc.fullname" .)) .Values.modelRepository.pvc.existingClaim }}
{{- end }}

{{/*
Paths inside every pod. The repository volume holds repository/ (what Triton loads) and bundles/
(what the publish Job reads), so Triton never sees bundles as models.
*/}}
{{- define "recsvc.modelsMount" -}}/models{{- end }}
{{- define "recsvc.repositoryPath" -}}/models/repository{{- end }}
{{- define "recsvc.bundlesPath" -}}/models/bundles{{- end }}
{{- define "recsvc.dataPath" -}}/var/lib/recsvc{{- end }}
{{- define "recsvc.denyListDir" -}}/etc/recsvc/deny-list{{- end }}
{{- define "recsvc.scriptsPath" -}}/opt/recsvc-deploy{{- end }}

{{/* Triton's gRPC address as recsvc dials it (RECSVC_TRITON_URL). */}}
{{- define "recsvc.tritonUrl" -}}
{{- printf "%s:%d" (include "recsvc.tritonName" .) (int .Values.triton.ports.grpc) }}
{{- end }}

{{/*
Triton's gRPC address for the publish and rollback Jobs: the admin Service, which also reaches Triton pods
that are not Ready yet. A Triton pod is Ready once it holds a ranker version, and before the first rollout
none does: the first rollout must reach one anyway.
*/}}
{{- define "recsvc.tritonAdminUrl" -}}
{{- printf "%s:%d" (include "recsvc.tritonAdminName" .) (int .Values.triton.ports.grpc) }}
{{- end }}

{{/*
rollout.drainSeconds must cover a replica noticing the switch (its serving.json poll, and the bucket's
with object storage) and its last request on the old version. recsvc's default request_timeout_s is 2.0
(tests/deploy checks this against recsvc.config.Settings).
*/}}
{{- define "recsvc.checkDrain" -}}
{{- $timeout := float64 (default 2.0 (index .Values.recsvc.settings "request_timeout_s")) }}
{{- $bound := addf (float64 .Values.recsvc.repositoryPollSeconds) $timeout }}
{{- if eq .Values.modelRepository.source "objectStorage" }}
{{- $bound = addf $bound (float64 .Values.modelRepository.objectStorage.servingPollSeconds) }}
{{- end }}
{{- if lt (float64 .Values.rollout.drainSeconds) $bound }}
{{- fail (printf "rollout.drainSeconds (%v) must be at least %v: recsvc.repositoryPollSeconds + request_timeout_s (+ modelRepository.objectStorage.servingPollSeconds), or replicas still use the old version when it is unloaded" .Values.rollout.drainSeconds $bound) }}
{{- end }}
{{- end }}

{{/* Whether the Redis address is a Redis Cluster (RECSVC_REDIS_CLUSTER). */}}
{{- define "recsvc.redisIsCluster" -}}
{{- if eq .Values.redis.mode "external" }}{{ .Values.redis.external.cluster }}{{ else }}false{{ end }}
{{- end }}

{{/*
Environment that names Redis for recsvc containers. For the bundled Redis a password is spliced into the
URL with Kubernetes' $(VAR) expansion, so it never appears in the manifest.
*/}}
{{- define "recsvc.redisEnv" -}}
- name: RECSVC_HISTORY_STORE
  value: redis
- name: RECSVC_REDIS_CLUSTER
  value: {{ include "recsvc.redisIsCluster" . | quote }}
{{- if eq .Values.redis.mode "external" }}
{{- if .Values.redis.external.existingSecret }}
- name: RECSVC_REDIS_URL
  valueFrom:
    secretKeyRef:
      name: {{ .Values.redis.external.existingSecret }}
      key: {{ .Values.redis.external.existingSecretKey }}
{{- else }}
- name: RECSVC_REDIS_URL
  value: {{ required "redis.external.url is required when redis.mode=external" .Values.redis.external.url | quote }}
{{- end }}
{{- else if .Values.redis.auth.existingSecret }}
- name: REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ .Values.redis.auth.existingSecret }}
      key: {{ .Values.redis.auth.existingSecretKey }}
- name: RECSVC_REDIS_URL
  value: {{ printf "redis://:$(REDIS_PASSWORD)@%s:6379/0" (include "recsvc.redisName" .) | quote }}
{{- else }}
- name: RECSVC_REDIS_URL
  value: {{ printf "redis://%s:6379/0" (include "recsvc.redisName" .) | quote }}
{{- end }}
{{- end }}

{{/* Settings every recsvc-image container shares: where the repository is and which model. */}}
{{- define "recsvc.commonEnv" -}}
{{ include "recsvc.commonEnvAt" (list . (include "recsvc.repositoryPath" .)) }}
{{- end }}

{{/* commonEnv with the repository somewhere else. Usage: include "recsvc.commonEnvAt" (list $ "/work/repository") */}}
{{- define "recsvc.commonEnvAt" -}}
{{- $root := index . 0 -}}
- name: RECSVC_MODEL_REPOSITORY
  value: {{ index . 1 | quote }}
- name: RECSVC_TRITON_MODEL
  value: {{ $root.Values.triton.model | quote }}
- name: RECSVC_DATA_DIR
  value: {{ include "recsvc.dataPath" $root | quote }}
# The root filesystem is read-only: libraries that cache under $HOME (torch, matplotlib) write to /tmp.
- name: HOME
  value: /tmp
{{- end }}

{{/* The model repository volume (pvc: the shared claim; objectStorage: this pod's local copy). */}}
{{- define "recsvc.modelsVolume" -}}
- name: models
{{- if eq .Values.modelRepository.source "pvc" }}
  persistentVolumeClaim:
    claimName: {{ include "recsvc.modelsClaimName" . }}
{{- else }}
  emptyDir:
    sizeLimit: {{ .Values.modelRepository.objectStorage.localSizeLimit }}
{{- end }}
{{- end }}

{{/* Environment of the rclone containers. */}}
{{- define "recsvc.rcloneEnv" -}}
{{ include "recsvc.remoteEnv" . }}
- name: MODEL
  value: {{ .Values.triton.model | quote }}
- name: REPOSITORY
  value: {{ include "recsvc.repositoryPath" . | quote }}
- name: HOME
  value: /tmp
{{- end }}

{{/* Where the bucket is and how rclone reaches it (credentials: recsvc.rcloneEnvFrom). */}}
{{- define "recsvc.remoteEnv" -}}
- name: REMOTE
  value: {{ required "modelRepository.objectStorage.remote is required when modelRepository.source=objectStorage" .Values.modelRepository.objectStorage.remote | quote }}
{{- range $k, $v := .Values.modelRepository.objectStorage.env }}
- name: {{ $k }}
  value: {{ $v | quote }}
{{- end }}
{{- end }}

{{/*
How often a Triton pod's sync sidecar writes its heartbeat (the versions its copy holds) to the bucket, and
how old a heartbeat may be before the Jobs consider that pod gone.
*/}}
{{- define "recsvc.ackSeconds" -}}10{{- end }}
{{- define "recsvc.ackMaxAgeSeconds" -}}35{{- end }}

{{- define "recsvc.rcloneEnvFrom" -}}
{{- with .Values.modelRepository.objectStorage.envFromSecret }}
envFrom:
  - secretRef:
      name: {{ . }}
{{- end }}
{{- end }}

{{- define "recsvc.rcloneImage" -}}
{{- include "recsvc.imageRef" .Values.modelRepository.objectStorage.image }}
{{- end }}

{{/* Pod-level security for pods whose images run as `uid`. Usage: include "recsvc.podSecurity" 10001 */}}
{{- define "recsvc.podSecurity" -}}
runAsNonRoot: true
runAsUser: {{ . }}
runAsGroup: {{ . }}
fsGroup: {{ . }}
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/* Container-level security shared by every container the chart runs. */}}
{{- define "recsvc.containerSecurity" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: [ALL]
{{- end }}

{{/* The Triton model configuration flavour for the target (recsvc/repository/templates/ranker_<flavour>.pbtxt). */}}
{{- define "recsvc.flavour" -}}{{ .Values.triton.target }}{{- end }}

{{/* How build-engines.sh builds a TensorRT engine (shared by Triton's init container and the publish Job). */}}
{{- define "recsvc.engineEnv" -}}
{{- $e := .Values.triton.engine -}}
- name: OPT_BATCH
  value: {{ $e.optBatch | quote }}
- name: MAX_BATCH
  value: {{ $e.maxBatch | quote }}
- name: FP16
  value: {{ ternary "1" "0" $e.fp16 | quote }}
- name: TRTEXEC_EXTRA_ARGS
  value: {{ join " " $e.extraArgs | quote }}
- name: BUILDER
  value: {{ include "recsvc.imageRef" $e.image | quote }}
- name: HOME
  value: /tmp
{{- end }}

{{/*
Security (README, "Security"): where Secrets are mounted, and the RECSVC_* settings that point at them.
Every Secret is mounted as a directory (never subPath), so renewals and token rotations reach running pods.
*/}}
{{- define "recsvc.tlsDir" -}}/etc/recsvc/tls{{- end }}
{{- define "recsvc.tokensDir" -}}/etc/recsvc/tokens{{- end }}
{{- define "recsvc.tritonClientTlsDir" -}}/etc/recsvc/triton-tls{{- end }}
{{- define "recsvc.tritonServerTlsDir" -}}/etc/triton/tls{{- end }}

{{/* The port recsvc itself listens on: behind the shedding proxy (recsvc.shed), the proxy has recsvc.port. */}}
{{- define "recsvc.serverPort" -}}
{{- if .Values.recsvc.shed.enabled }}{{ .Values.recsvc.shed.upstreamPort }}{{ else }}{{ .Values.recsvc.port }}{{ end }}
{{- end }}

{{/* recsvc's drain delay (RECSVC_DRAIN_DELAY_S). Behind the proxy it stops accepting a second after the
     proxy has stopped (files/proxy-drain.sh), so that nothing the proxy forwards finds it closed. */}}
{{- define "recsvc.serverDrainDelay" -}}
{{- if .Values.recsvc.shed.enabled }}{{ addf (float64 .Values.recsvc.drainDelaySeconds) 1 }}{{ else }}{{ .Values.recsvc.drainDelaySeconds }}{{ end }}
{{- end }}

{{/* The server's probes ask recsvc directly (never through the proxy, which would refuse them under load),
     on the plaintext health-only port when TLS is on the gRPC port. */}}
{{- define "recsvc.probePort" -}}
{{- if .Values.recsvc.tls.enabled }}{{ .Values.recsvc.tls.healthPort }}{{ else }}{{ include "recsvc.serverPort" . }}{{ end }}
{{- end }}

{{/* The server's TLS and token settings. */}}
{{- define "recsvc.serverSecurityEnv" -}}
{{- $r := .Values.recsvc }}
{{- $tls := include "recsvc.tlsDir" . }}
{{- if $r.tls.enabled }}
- name: RECSVC_TLS_CERT
  value: {{ printf "%s/tls.crt" $tls | quote }}
- name: RECSVC_TLS_KEY
  value: {{ printf "%s/tls.key" $tls | quote }}
- name: RECSVC_HEALTH_PORT
  value: {{ $r.tls.healthPort | quote }}
{{- if $r.tls.requireClientCert }}
- name: RECSVC_TLS_CLIENT_CA
  value: {{ printf "%s/ca.crt" $tls | quote }}
- name: RECSVC_TLS_REQUIRE_CLIENT_CERT
  value: "true"
{{- with $r.tls.writeAllowedIdentities }}
- name: RECSVC_WRITE_ALLOWED_IDENTITIES
  value: {{ join "," . | quote }}
{{- end }}
{{- end }}
{{- end }}
{{- if $r.auth.writeToken.secretName }}
- name: RECSVC_WRITE_TOKEN_FILE
  value: {{ printf "%s/write/token" (include "recsvc.tokensDir" .) | quote }}
{{- end }}
{{- if $r.auth.readToken.secretName }}
- name: RECSVC_READ_TOKEN_FILE
  value: {{ printf "%s/read/token" (include "recsvc.tokensDir" .) | quote }}
{{- end }}
{{- end }}

{{- define "recsvc.serverSecurityMounts" -}}
{{- $r := .Values.recsvc }}
{{- if $r.tls.enabled }}
- {name: tls, mountPath: {{ include "recsvc.tlsDir" . }}, readOnly: true}
{{- end }}
{{- if $r.auth.writeToken.secretName }}
- {name: write-token, mountPath: {{ printf "%s/write" (include "recsvc.tokensDir" .) }}, readOnly: true}
{{- end }}
{{- if $r.auth.readToken.secretName }}
- {name: read-token, mountPath: {{ printf "%s/read" (include "recsvc.tokensDir" .) }}, readOnly: true}
{{- end }}
{{- end }}

{{- define "recsvc.serverSecurityVolumes" -}}
{{- $r := .Values.recsvc }}
{{- if $r.tls.enabled }}
- name: tls
  secret:
    secretName: {{ $r.tls.secretName }}
    defaultMode: 0440
{{- end }}
{{- range $name, $token := dict "write-token" $r.auth.writeToken "read-token" $r.auth.readToken }}
{{- if $token.secretName }}
- name: {{ $name }}
  secret:
    secretName: {{ $token.secretName }}
    defaultMode: 0440
    items:
      - {key: {{ $token.key }}, path: token}
{{- end }}
{{- end }}
{{- end }}

{{/* Template-time checks of combinations recsvc would refuse at start-up. */}}
{{- define "recsvc.checkSecurity" -}}
{{- $r := .Values.recsvc }}
{{- if and $r.tls.writeAllowedIdentities (not (and $r.tls.enabled $r.tls.requireClientCert)) }}
{{- fail "recsvc.tls.writeAllowedIdentities needs mutual TLS (recsvc.tls.enabled and recsvc.tls.requireClientCert)" }}
{{- end }}
{{- if and $r.auth.readToken.secretName (not (or $r.auth.writeToken.secretName $r.tls.writeAllowedIdentities)) }}
{{- fail "recsvc.auth.readToken needs writes protected too (recsvc.auth.writeToken or recsvc.tls.writeAllowedIdentities)" }}
{{- end }}
{{- if and $r.tls.enabled $r.shed.enabled }}
{{- fail "recsvc.shed (HAProxy in front of recsvc) reads HTTP/2 streams and cannot stand in front of recsvc.tls: set recsvc.shed.enabled=false and shed in the ingress or mesh" }}
{{- end }}
{{- if and $r.shed.enabled (has (int $r.shed.upstreamPort) (list (int $r.port) (int $r.metricsPort))) }}
{{- fail "recsvc.shed.upstreamPort must differ from recsvc.port and recsvc.metricsPort" }}
{{- end }}
{{- if and $r.tls.enabled (or (eq (int $r.tls.healthPort) (int $r.port)) (eq (int $r.tls.healthPort) (int $r.metricsPort))) }}
{{- fail "recsvc.tls.healthPort must differ from recsvc.port and recsvc.metricsPort" }}
{{- end }}
{{- end }}

{{/* RECSVC_TRITON_TLS* for every container that dials Triton: the server, triton-sync, the rollout Jobs. */}}
{{- define "recsvc.tritonTlsEnv" -}}
{{- $tls := .Values.triton.tls }}
{{- $dir := include "recsvc.tritonClientTlsDir" . }}
{{- if $tls.enabled }}
- name: RECSVC_TRITON_TLS
  value: "true"
- name: RECSVC_TRITON_CA
  value: {{ printf "%s/ca.crt" $dir | quote }}
{{- if $tls.mutual }}
- name: RECSVC_TRITON_CERT
  value: {{ printf "%s/tls.crt" $dir | quote }}
- name: RECSVC_TRITON_KEY
  value: {{ printf "%s/tls.key" $dir | quote }}
{{- end }}
{{- end }}
{{- end }}

{{- define "recsvc.tritonTlsMount" -}}
{{- if .Values.triton.tls.enabled }}
- {name: triton-tls-client, mountPath: {{ include "recsvc.tritonClientTlsDir" . }}, readOnly: true}
{{- end }}
{{- end }}

{{- define "recsvc.tritonTlsVolume" -}}
{{- if .Values.triton.tls.enabled }}
- name: triton-tls-client
  secret:
    secretName: {{ .Values.triton.tls.clientSecretName }}
    defaultMode: 0440
{{- end }}
{{- end }}
