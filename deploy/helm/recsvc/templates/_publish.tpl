{{/*
The publish Job's pod: fetch (object storage) -> publish or stage (recsvc publish) -> build-engine (gpu)
-> commit (volume) or upload (object storage). Steps run in order as init containers; the last is the
Job's container. Each step's script is in files/ and says what it does.
*/}}
{{- define "recsvc.publishPodSpec" -}}
{{- $p := .Values.publish }}
{{- $t := .Values.triton }}
{{- $gpu := eq $t.target "gpu" }}
{{- $objectStorage := eq .Values.modelRepository.source "objectStorage" }}
{{- $scripts := include "recsvc.scriptsPath" . }}
{{- $bundleDir := "" }}
{{- if $p.bundle }}
{{- $bundleDir = ternary "/work/bundle" (printf "%s/%s" (include "recsvc.bundlesPath" .) $p.bundle) $objectStorage }}
{{- end }}
{{- $engineRes := deepCopy $t.engine.resources }}
{{- $req := default (dict) $engineRes.requests }}{{- $_ := set $req "nvidia.com/gpu" $t.gpusPerPod }}{{- $_ := set $engineRes "requests" $req }}
{{- $lim := default (dict) $engineRes.limits }}{{- $_ := set $lim "nvidia.com/gpu" $t.gpusPerPod }}{{- $_ := set $engineRes "limits" $lim }}
{{- /* The steps, in order; the last is the Job's container, the others its init containers. */}}
{{- $steps := list }}
{{- if $objectStorage }}
{{- $steps = append $steps "fetch" }}
{{- end }}
{{- $steps = append $steps (ternary "publish" "stage" (and (not $objectStorage) (not $gpu))) }}
{{- if $gpu }}
{{- $steps = append $steps "build-engine" }}
{{- end }}
{{- if $objectStorage }}
{{- $steps = append $steps "upload" }}
{{- else if $gpu }}
{{- $steps = append $steps "commit" }}
{{- end }}
serviceAccountName: {{ include "recsvc.serviceAccountName" . }}
automountServiceAccountToken: {{ .Values.serviceAccount.automountServiceAccountToken }}
restartPolicy: Never
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
securityContext:
  {{- include "recsvc.podSecurity" 10001 | nindent 2 }}
{{- if $gpu }}
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
      - name: BUNDLE
        value: {{ $p.bundle | quote }}
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
    {{- else }}
    command: [sh, {{ printf "%s/publish.sh" $scripts | quote }}, {{ ternary "direct" "stage" (eq $step "publish") }}]
    {{- end }}
    env:
      {{- include "recsvc.commonEnv" $ | nindent 6 }}
      - name: MODEL
        value: {{ $t.model | quote }}
      - name: FLAVOUR
        value: {{ $t.target | quote }}
      - name: WORK
        value: /work
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
    resources:
      {{- toYaml $p.resources | nindent 6 }}
{{- end }}
    securityContext:
      {{- include "recsvc.containerSecurity" $ | nindent 6 }}
    volumeMounts:
      {{- if not $objectStorage }}
      {{- /* Only the steps that write the shared repository mount it writable. */}}
      - {name: models, mountPath: {{ include "recsvc.modelsMount" $ }}{{ if not (has $step (list "publish" "commit")) }}, readOnly: true{{ end }}}
      {{- end }}
      - {name: work, mountPath: /work}
      - {name: data, mountPath: {{ include "recsvc.dataPath" $ }}}
      - {name: scripts, mountPath: {{ $scripts }}, readOnly: true}
      - {name: tmp, mountPath: /tmp}
{{- end }}
volumes:
  {{- if not $objectStorage }}
  {{- include "recsvc.modelsVolume" . | nindent 2 }}
  {{- end }}
  - name: work
    emptyDir: {}
  - name: data
    emptyDir: {}
  - name: tmp
    emptyDir: {}
  - name: scripts
    configMap:
      name: {{ include "recsvc.scriptsName" . }}
{{- end }}
