{{- define "ratelimiter.fullname" -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "ratelimiter.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end -}}

{{- define "ratelimiter.selector" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "ratelimiter.postgresqlSelector" -}}
app.kubernetes.io/name: {{ .Chart.Name }}-postgresql
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "ratelimiter.secretName" -}}
{{- default (include "ratelimiter.fullname" .) .Values.existingSecret -}}
{{- end -}}

{{/*
The variables the config names as os.environ/NAME and nothing else sets (REDIS_URL, the master
key and extraEnv are set already), sorted and joined by commas: the pods take them from
providerSecret, so the config never names a variable the pod lacks.
*/}}
{{- define "ratelimiter.providerEnv" -}}
{{- $set := list "REDIS_URL" "RATELIMITER_MASTER_KEY" -}}
{{- range .Values.extraEnv -}}
{{- $set = append $set .name -}}
{{- end -}}
{{- $names := list -}}
{{- range regexFindAll "os\\.environ/[A-Za-z_][A-Za-z0-9_]*" (toYaml .Values.config) -1 -}}
{{- $name := trimPrefix "os.environ/" . -}}
{{- if not (has $name $set) -}}
{{- $names = append $names $name -}}
{{- end -}}
{{- end -}}
{{- $names | uniq | sortAlpha | join "," -}}
{{- end -}}

{{/*
The Secret and key the pods read RATELIMITER_LEDGER_SINK from, as "name/key", or "" for no sink.
*/}}
{{- define "ratelimiter.ledgerSink" -}}
{{- if and .Values.postgresql.enabled .Values.ledgerSink.existingSecret -}}
{{- fail "set ledgerSink.existingSecret or postgresql.enabled, not both" -}}
{{- else if .Values.postgresql.enabled -}}
{{- printf "%s-postgresql/ledger-sink" (include "ratelimiter.fullname" .) -}}
{{- else if .Values.ledgerSink.existingSecret -}}
{{- printf "%s/ledger-sink" .Values.ledgerSink.existingSecret -}}
{{- end -}}
{{- end -}}
