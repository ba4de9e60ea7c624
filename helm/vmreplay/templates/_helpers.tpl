{{/* Chart name. */}}
{{- define "vmreplay.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name: <release>-<chart> unless overridden. */}}
{{- define "vmreplay.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* Labels on every object. */}}
{{- define "vmreplay.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "vmreplay.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: vmreplay
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Selector labels of one component: include with (dict "ctx" $ "component" "replayer"). */}}
{{- define "vmreplay.selectorLabels" -}}
app.kubernetes.io/name: {{ include "vmreplay.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* Labels of one component's objects. */}}
{{- define "vmreplay.componentLabels" -}}
{{ include "vmreplay.labels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* Image reference: include with (dict "ctx" $ "image" .Values.x.image). */}}
{{- define "vmreplay.image" -}}
{{- if .image.digest -}}
{{ .image.repository }}@{{ .image.digest }}
{{- else -}}
{{ .image.repository }}:{{ .image.tag | default .ctx.Chart.AppVersion }}
{{- end -}}
{{- end }}

{{/* True when this chart deploys its own registry. */}}
{{- define "vmreplay.ownRegistry" -}}
{{- if not .Values.schemaRegistry.externalUrl }}true{{ end }}
{{- end }}

{{/* The registry URL every component uses. */}}
{{- define "vmreplay.registryUrl" -}}
{{- if .Values.schemaRegistry.externalUrl -}}
{{ .Values.schemaRegistry.externalUrl }}
{{- else -}}
http://{{ include "vmreplay.fullname" . }}-schema-registry.{{ .Release.Namespace }}.svc:{{ .Values.schemaRegistry.port }}
{{- end -}}
{{- end }}

{{/* The replayer's gRPC address inside the cluster. */}}
{{- define "vmreplay.replayerAddress" -}}
{{ include "vmreplay.fullname" . }}-replayer.{{ .Release.Namespace }}.svc:{{ .Values.replayer.grpcPort }}
{{- end }}

{{/* Object-store environment (S3 settings are read from AWS_*). */}}
{{- define "vmreplay.objectStoreEnv" -}}
{{- with .Values.objectStore.endpoint }}
- name: AWS_ENDPOINT_URL
  value: {{ . | quote }}
{{- end }}
- name: AWS_REGION
  value: {{ .Values.objectStore.region | quote }}
{{- with .Values.objectStore.credentialsSecret }}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef: {name: {{ . | quote }}, key: AWS_ACCESS_KEY_ID}
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef: {name: {{ . | quote }}, key: AWS_SECRET_ACCESS_KEY}
{{- end }}
{{- end }}

{{/* The [endpoints] table shared by the agent's and the CLI's config. */}}
{{- define "vmreplay.endpointsToml" -}}
[endpoints]
bootstrap-servers = {{ .Values.kafka.bootstrapServers | quote }}
registry-url = {{ include "vmreplay.registryUrl" . | quote }}
object-store-url = {{ .Values.objectStore.url | quote }}
event-partitions = {{ .Values.kafka.eventPartitions }}
{{- end }}
