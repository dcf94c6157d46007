{{/* Names ------------------------------------------------------------------ */}}
{{- define "pdroute.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "pdroute.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "pdroute.eppName" -}}{{ include "pdroute.fullname" . }}-epp{{- end -}}
{{- define "pdroute.poolName" -}}{{ default (include "pdroute.fullname" .) .Values.pool.name }}{{- end -}}
{{- define "pdroute.prefillName" -}}{{ include "pdroute.fullname" . }}-prefill{{- end -}}
{{- define "pdroute.decodeName" -}}{{ include "pdroute.fullname" . }}-decode{{- end -}}

{{- define "pdroute.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* Labels ----------------------------------------------------------------- */}}
{{- define "pdroute.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "pdroute.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "pdroute.eppSelectorLabels" -}}
app.kubernetes.io/name: {{ include "pdroute.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: epp
{{- end -}}

{{/* Labels the InferencePool selects: the user's, or those of our own model servers. */}}
{{- define "pdroute.poolMatchLabels" -}}
{{- if .Values.pool.matchLabels -}}
{{ toYaml .Values.pool.matchLabels }}
{{- else -}}
pdroute.io/pool: {{ include "pdroute.poolName" . }}
{{- end -}}
{{- end -}}

{{/* Role label of the decode Deployment: aggregated servers do both phases. */}}
{{- define "pdroute.decodeRole" -}}
{{- if .Values.modelServers.disaggregated -}}decode{{- else -}}prefill-decode{{- end -}}
{{- end -}}

{{- define "pdroute.leaderElection" -}}
{{- $m := .Values.epp.leaderElection -}}
{{- if or (eq $m "enabled") (and (eq $m "auto") (gt (int .Values.epp.replicas) 1)) -}}true{{- end -}}
{{- end -}}

{{- define "pdroute.modelServerSA" -}}
{{- if .Values.modelServers.serviceAccount.create -}}
{{- default (printf "%s-model-server" (include "pdroute.fullname" .)) .Values.modelServers.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.modelServers.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "pdroute.servedModelName" -}}
{{- default .Values.modelServers.model .Values.modelServers.servedModelName -}}
{{- end -}}
