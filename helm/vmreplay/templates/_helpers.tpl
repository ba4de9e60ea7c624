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
event-partitions = {{ .Values.kafka.eventPartitions | int64 }}

[endpoints.kafka-security]
{{ include "vmreplay.kafkaSecurityKeys" (dict "ctx" . "sep" "-") }}
{{- end }}

{{/* Where the pods mount the Kafka security Secrets. */}}
{{- define "vmreplay.kafkaCaDir" -}}/etc/vmreplay-kafka/ca{{- end }}
{{- define "vmreplay.kafkaClientDir" -}}/etc/vmreplay-kafka/client{{- end }}
{{- define "vmreplay.kafkaSaslDir" -}}/etc/vmreplay-kafka/sasl{{- end }}

{{/* True when the Kafka protocol uses SASL / TLS. */}}
{{- define "vmreplay.kafkaSasl" -}}
{{- if hasPrefix "SASL_" .Values.kafka.securityProtocol }}true{{ end }}
{{- end }}
{{- define "vmreplay.kafkaTls" -}}
{{- if hasSuffix "SSL" .Values.kafka.securityProtocol }}true{{ end }}
{{- end }}

{{/* The keys of a Kafka security table, every binary's format:
     include with (dict "ctx" $ "sep" "-") for kebab-case, "_" for snake_case. */}}
{{- define "vmreplay.kafkaSecurityKeys" -}}
{{- $k := .ctx.Values.kafka }}
{{- $s := .sep -}}
protocol = {{ $k.securityProtocol | quote }}
{{- if include "vmreplay.kafkaSasl" .ctx }}
sasl{{ $s }}mechanism = {{ $k.sasl.mechanism | quote }}
# The user name comes from VMR_KAFKA_SASL_USERNAME (Secret {{ $k.sasl.existingSecret }}).
sasl{{ $s }}password{{ $s }}file = {{ printf "%s/%s" (include "vmreplay.kafkaSaslDir" .ctx) $k.sasl.passwordKey | quote }}
{{- end }}
{{- if include "vmreplay.kafkaTls" .ctx }}
{{- with $k.tls.caSecret }}
ssl{{ $s }}ca{{ $s }}file = {{ printf "%s/%s" (include "vmreplay.kafkaCaDir" $.ctx) $k.tls.caKey | quote }}
{{- end }}
{{- with $k.tls.clientCertSecret }}
ssl{{ $s }}cert{{ $s }}file = {{ printf "%s/%s" (include "vmreplay.kafkaClientDir" $.ctx) $k.tls.certKey | quote }}
ssl{{ $s }}key{{ $s }}file = {{ printf "%s/%s" (include "vmreplay.kafkaClientDir" $.ctx) $k.tls.keyKey | quote }}
{{- end }}
{{- end }}
{{- end }}

{{/* Environment of a container that talks to Kafka (the SASL user name). */}}
{{- define "vmreplay.kafkaEnv" -}}
{{- if include "vmreplay.kafkaSasl" . }}
- name: VMR_KAFKA_SASL_USERNAME
  valueFrom:
    secretKeyRef: {name: {{ required "kafka.sasl.existingSecret is required with SASL" .Values.kafka.sasl.existingSecret | quote }}, key: {{ .Values.kafka.sasl.usernameKey | quote }}}
{{- end }}
{{- end }}

{{/* Volume mounts of the Kafka security Secrets. */}}
{{- define "vmreplay.kafkaVolumeMounts" -}}
{{- if include "vmreplay.kafkaSasl" . }}
- {name: kafka-sasl, mountPath: {{ include "vmreplay.kafkaSaslDir" . }}, readOnly: true}
{{- end }}
{{- if and (include "vmreplay.kafkaTls" .) .Values.kafka.tls.caSecret }}
- {name: kafka-ca, mountPath: {{ include "vmreplay.kafkaCaDir" . }}, readOnly: true}
{{- end }}
{{- if and (include "vmreplay.kafkaTls" .) .Values.kafka.tls.clientCertSecret }}
- {name: kafka-client, mountPath: {{ include "vmreplay.kafkaClientDir" . }}, readOnly: true}
{{- end }}
{{- end }}

{{/* Volumes of the Kafka security Secrets (only the keys the clients read). */}}
{{- define "vmreplay.kafkaVolumes" -}}
{{- $k := .Values.kafka }}
{{- if include "vmreplay.kafkaSasl" . }}
- name: kafka-sasl
  secret:
    secretName: {{ $k.sasl.existingSecret | quote }}
    items: [{key: {{ $k.sasl.passwordKey | quote }}, path: {{ $k.sasl.passwordKey | quote }}}]
{{- end }}
{{- if and (include "vmreplay.kafkaTls" .) $k.tls.caSecret }}
- name: kafka-ca
  secret:
    secretName: {{ $k.tls.caSecret | quote }}
    items: [{key: {{ $k.tls.caKey | quote }}, path: {{ $k.tls.caKey | quote }}}]
{{- end }}
{{- if and (include "vmreplay.kafkaTls" .) $k.tls.clientCertSecret }}
- name: kafka-client
  secret:
    secretName: {{ $k.tls.clientCertSecret | quote }}
    items:
      - {key: {{ $k.tls.certKey | quote }}, path: {{ $k.tls.certKey | quote }}}
      - {key: {{ $k.tls.keyKey | quote }}, path: {{ $k.tls.keyKey | quote }}}
{{- end }}
{{- end }}
