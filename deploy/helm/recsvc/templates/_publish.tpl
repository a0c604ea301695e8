{{/*
The pods of the Jobs that change what serves: publish and rollback. Steps run in order as init containers;
the last is the Job's container. Each step's script is in files/ and says what it does.

  publish, cpu, volume:          publish (publish.sh direct: `recsvc publish BUNDLE`, rollout included)
  publish, gpu, volume:          stage -> build-engine -> commit -> rollout (`recsvc rollout N`)
  publish, object storage:       fetch -> stage [-> build-engine] -> upload -> rollout
  rollback, volume:              rollback (`recsvc rollback --to V`)
  rollback, object storage:      fetch -> rollback

Every step that rolls out (publish direct, rollout, rollback) goes through files/rollout.py, which waits for
Triton, records what it carried out in <repository>/<model>/.chart-jobs, and with object storage works on
the scratch copy in /work/repository and uploads serving.json whenever recsvc rewrites it.

Usage: include "recsvc.jobPodSpec" (list $ "publish")
*/}}
{{- define "recsvc.jobPodSpec" -}}
{{- $ := index . 0 }}
{{- $kind := index . 1 }}
{{- $p := $.Values.publish }}
{{- $t := $.Values.triton }}
{{- $gpu := eq $t.target "gpu" }}
{{- $objectStorage := eq $.Values.modelRepository.source "objectStorage" }}
{{- $scripts := include "recsvc.scriptsPath" $ }}
{{- $bundleDir := "" }}
{{- if $p.bundle }}
{{- $bundleDir = ternary "/work/bundle" (printf "%s/%s" (include "recsvc.bundlesPath" $) $p.bundle) $objectStorage }}
{{- end }}
{{- /* Where the rollout steps find the repository: the shared volume, or the Job's scratch copy. */}}
{{- $rolloutRepository := ternary "/work/repository" (include "recsvc.repositoryPath" $) $objectStorage }}
{{- $engineRes := deepCopy $t.engine.resources }}
{{- $req := default (dict) $engineRes.requests }}{{- $_ := set $req "nvidia.com/gpu" $t.gpusPerPod }}{{- $_ := set $engineRes "requests" $req }}
{{- $lim := default (dict) $engineRes.limits }}{{- $_ := set $lim "nvidia.com/gpu" $t.gpusPerPod }}{{- $_ := set $engineRes "limits" $lim }}
{{- /* The steps, in order; the last is the Job's container, the others its init containers. */}}
{{- $steps := list }}
{{- if $objectStorage }}
{{- $steps = append $steps "fetch" }}
{{- end }}
{{- if eq $kind "rollback" }}
{{- $steps = append $steps "rollback" }}
{{- else }}
{{- $direct := and (not $objectStorage) (not $gpu) }}
{{- $steps = append $steps (ternary "publish" "stage" $direct) }}
{{- if $gpu }}
{{- $steps = append $steps "build-engine" }}
{{- end }}
{{- if $objectStorage }}
{{- $steps = append $steps "upload" }}
{{- else if $gpu }}
{{- $steps = append $steps "commit" }}
{{- end }}
{{- if not $direct }}
{{- $steps = append $steps "rollout" }}
{{- end }}
{{- end }}
{{- /* Steps that write the shared volume (and so mount it writable). */}}
{{- $writers := list "publish" "commit" "rollout" "rollback" }}
serviceAccountName: {{ include "recsvc.serviceAccountName" $ }}
automountServiceAccountToken: {{ $.Values.serviceAccount.automountServiceAccountToken }}
restartPolicy: Never
{{- with $.Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
securityContext:
  {{- include "recsvc.podSecurity" 10001 | nindent 2 }}
{{- if and $gpu (has "build-engine" $steps) }}
{{- /* The engine is built on a GPU like the ones that will run it: Triton's placement rules. */}}
{{- if $t.runtimeClassName }}
runtimeClassName: {{ $t.runtimeClassName }}
{{- end }}
{{- with $t.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with concat $t.tolerations $t.gpuTolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $t.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}
{{- range $i, $step := $steps }}
{{- if eq $i 0 }}
{{- if gt (len $steps) 1 }}
initContainers:
{{- else }}
containers:
{{- end }}
{{- else if eq $i (sub (len $steps) 1) }}
containers:
{{- end }}
{{- if or (eq $step "fetch") (eq $step "upload") }}
  - name: {{ $step }}
    image: {{ include "recsvc.rcloneImage" $ }}
    imagePullPolicy: {{ $.Values.modelRepository.objectStorage.image.pullPolicy }}
    command: [sh, {{ printf "%s/object-store.sh" $scripts | quote }}, {{ $step }}]
    env:
      {{- include "recsvc.rcloneEnv" $ | nindent 6 }}
      - name: WORK
        value: /work
      {{- if eq $kind "publish" }}
      - name: BUNDLE
        value: {{ $p.bundle | quote }}
      {{- end }}
    {{- include "recsvc.rcloneEnvFrom" $ | nindent 4 }}
    resources:
      {{- toYaml $.Values.modelRepository.objectStorage.resources | nindent 6 }}
{{- else if eq $step "build-engine" }}
  - name: build-engine
    image: {{ include "recsvc.imageRef" $t.engine.image }}
    imagePullPolicy: {{ $t.engine.image.pullPolicy }}
    command: [bash, {{ printf "%s/build-engines.sh" $scripts | quote }}]
    workingDir: /tmp
    env:
      # Only the staged version has a model.onnx in the scratch repository.
      - name: REPOSITORY
        value: /work/repository
      - name: MODEL
        value: {{ $t.model | quote }}
      {{- include "recsvc.engineEnv" $ | nindent 6 }}
    resources:
      {{- toYaml $engineRes | nindent 6 }}
{{- else }}
  - name: {{ $step }}
    image: {{ include "recsvc.image" $ }}
    imagePullPolicy: {{ $.Values.image.pullPolicy }}
    {{- if eq $step "commit" }}
    command: [sh, {{ printf "%s/commit-version.sh" $scripts | quote }}]
    {{- else if eq $step "rollout" }}
    # `recsvc rollout N`: N is the version the steps before published (or one an earlier run published
    # and never rolled out).
    command: [python, {{ printf "%s/rollout.py" $scripts | quote }}, rollout]
    {{- else if eq $step "rollback" }}
    # `recsvc rollback --to V`: V is rollback.toVersion, or the previous serving version.
    command: [python, {{ printf "%s/rollout.py" $scripts | quote }}, rollback]
    {{- else }}
    command: [sh, {{ printf "%s/publish.sh" $scripts | quote }}, {{ ternary "direct" "stage" (eq $step "publish") }}]
    {{- end }}
    env:
      {{- if has $step (list "publish" "rollout" "rollback") }}
      {{- include "recsvc.commonEnvAt" (list $ $rolloutRepository) | nindent 6 }}
      # The rollout reaches Triton through the admin Service (Ready or not) and drains this long.
      - name: RECSVC_TRITON_URL
        value: {{ include "recsvc.tritonAdminUrl" $ | quote }}
      {{- include "recsvc.tritonTlsEnv" $ | nindent 6 }}
      - name: RECSVC_ROLLOUT_DRAIN_S
        value: {{ $.Values.rollout.drainSeconds | quote }}
      - name: RECSVC_ROLLOUT_READY_TIMEOUT_S
        value: {{ $.Values.rollout.readyTimeoutSeconds | quote }}
      - name: TRITON_WAIT_S
        value: {{ $.Values.rollout.tritonWaitSeconds | quote }}
      {{- else }}
      {{- include "recsvc.commonEnv" $ | nindent 6 }}
      {{- end }}
      - name: WORK
        value: /work
      {{- if eq $step "rollback" }}
      - name: ROLLBACK_REQUEST
        value: {{ $.Values.rollback.request | quote }}
      - name: ROLLBACK_TO
        value: {{ $.Values.rollback.toVersion | quote }}
      {{- end }}
      {{- if has $step (list "publish" "stage" "commit") }}
      - name: MODEL
        value: {{ $t.model | quote }}
      - name: FLAVOUR
        value: {{ $t.target | quote }}
      {{- if not $objectStorage }}
      - name: REPOSITORY
        value: {{ include "recsvc.repositoryPath" $ | quote }}
      {{- end }}
      - name: BUNDLE_DIR
        value: {{ $bundleDir | quote }}
      - name: TRAIN_IF_EMPTY
        value: {{ ternary "1" "0" $p.trainIfEmpty | quote }}
      - name: TRAIN_ARGS
        value: {{ join " " $p.trainArgs | quote }}
      {{- end }}
      {{- if and $objectStorage (has $step (list "rollout" "rollback")) }}
      # The bucket: serving.json and .chart-jobs are uploaded with the rclone binary the fetch step
      # copied, after every Triton pod's copy holds the version (their heartbeats).
      {{- include "recsvc.remoteEnv" $ | nindent 6 }}
      - name: RCLONE
        value: /work/bin/rclone
      - name: KEEP_VERSIONS
        value: {{ $.Values.modelRepository.objectStorage.keepVersions | quote }}
      - name: ACK_MAX_AGE_S
        value: {{ include "recsvc.ackMaxAgeSeconds" $ | quote }}
      {{- end }}
    {{- if and $objectStorage (has $step (list "rollout" "rollback")) }}
    {{- include "recsvc.rcloneEnvFrom" $ | nindent 4 }}
    {{- end }}
    resources:
      {{- toYaml (ternary $p.resources $.Values.rollout.resources (has $step (list "publish" "stage"))) | nindent 6 }}
{{- end }}
    securityContext:
      {{- include "recsvc.containerSecurity" $ | nindent 6 }}
    volumeMounts:
      {{- if not $objectStorage }}
      {{- /* Only the steps that write the shared repository mount it writable. */}}
      - {name: models, mountPath: {{ include "recsvc.modelsMount" $ }}{{ if not (has $step $writers) }}, readOnly: true{{ end }}}
      {{- end }}
      - {name: work, mountPath: /work}
      - {name: data, mountPath: {{ include "recsvc.dataPath" $ }}}
      - {name: scripts, mountPath: {{ $scripts }}, readOnly: true}
      - {name: tmp, mountPath: /tmp}
      {{- if has $step (list "publish" "rollout" "rollback") }}
      {{- include "recsvc.tritonTlsMount" $ | nindent 6 }}
      {{- end }}
{{- end }}
volumes:
  {{- if not $objectStorage }}
  {{- include "recsvc.modelsVolume" $ | nindent 2 }}
  {{- end }}
  - name: work
    emptyDir: {}
  - name: data
    emptyDir: {}
  - name: tmp
    emptyDir: {}
  - name: scripts
    configMap:
      name: {{ include "recsvc.scriptsName" $ }}
  {{- include "recsvc.tritonTlsVolume" $ | nindent 2 }}
{{- end }}
