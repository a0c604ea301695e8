{{/* The seed Job's pod: `recsvc seed` with the service's Redis settings. */}}
{{- define "recsvc.seedPodSpec" -}}
serviceAccountName: {{ include "recsvc.serviceAccountName" . }}
automountServiceAccountToken: {{ .Values.serviceAccount.automountServiceAccountToken }}
restartPolicy: Never
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
securityContext:
  {{- include "recsvc.podSecurity" 10001 | nindent 2 }}
containers:
  - name: seed
    image: {{ include "recsvc.image" . }}
    imagePullPolicy: {{ .Values.image.pullPolicy }}
    command: [recsvc, seed, --if-empty]
    args:
      {{- toYaml .Values.seed.args | nindent 6 }}
    env:
      {{- include "recsvc.commonEnv" . | nindent 6 }}
      {{- include "recsvc.redisEnv" . | nindent 6 }}
    resources:
      {{- toYaml .Values.seed.resources | nindent 6 }}
    securityContext:
      {{- include "recsvc.containerSecurity" . | nindent 6 }}
    volumeMounts:
      - {name: data, mountPath: {{ include "recsvc.dataPath" . }}}
      - {name: tmp, mountPath: /tmp}
volumes:
  - name: data
    emptyDir: {}
  - name: tmp
    emptyDir: {}
{{- end }}
