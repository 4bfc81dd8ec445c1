{{/*
Chart name, truncated to 63 characters (the DNS label limit).
*/}}
{{- define "expertmesh.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name of the release's objects: the release name, prefixed with the chart name unless
the release name already contains it.
*/}}
{{- define "expertmesh.fullname" -}}
{{- if contains .Chart.Name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{/*
Chart name and version, for the helm.sh/chart label.
*/}}
{{- define "expertmesh.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels on every object.
*/}}
{{- define "expertmesh.labels" -}}
helm.sh/chart: {{ include "expertmesh.chart" . }}
{{ include "expertmesh.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: operator
app.kubernetes.io/part-of: expertmesh
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/*
Labels that select the operator pods (immutable once installed: keep them stable).
*/}}
{{- define "expertmesh.selectorLabels" -}}
app.kubernetes.io/name: {{ include "expertmesh.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
Labels that select the operator pods for the metrics Service and the ServiceMonitor: the
Deployment's selector plus the component. Model pods carry app.kubernetes.io/name
expertmesh and their model's name as the instance, so a model named like the release would
match the Deployment's selector alone. Services' selectors can change on upgrade; the
Deployment's cannot, so it keeps the two labels.
*/}}
{{- define "expertmesh.operatorSelectorLabels" -}}
{{ include "expertmesh.selectorLabels" . }}
app.kubernetes.io/component: operator
{{- end }}

{{/*
Name of the operator's ServiceAccount.
*/}}
{{- define "expertmesh.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "expertmesh.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
Image tag: image.tag, or the chart's appVersion.
*/}}
{{- define "expertmesh.imageTag" -}}
{{- default .Chart.AppVersion .Values.image.tag | toString }}
{{- end }}

{{/*
Name of the leader-election Lease. Fixed: the operator looks for it by this name.
*/}}
{{- define "expertmesh.leaseName" -}}
expertmesh-operator
{{- end }}

{{/*
What the operator may do with the objects it reconciles, in every namespace it watches
(ClusterRole in cluster-wide mode, one Role per namespace in namespaced mode). Least
privilege, no wildcards; the test in test/operator/helm.test.ts pins this list exactly.
Leases are not here: leader election gets its own Role in the release namespace.
*/}}
{{- define "expertmesh.operatorRules" -}}
- apiGroups: ["expertmesh.io"]
  resources: ["deepseekmodels"]
  verbs: ["get", "list", "watch"]
- apiGroups: ["expertmesh.io"]
  resources: ["deepseekmodels/status"]
  verbs: ["get", "update", "patch"]
- apiGroups: ["expertmesh.io"]
  resources: ["deepseekmodels/finalizers"]
  verbs: ["update"]
- apiGroups: [""]
  resources: ["configmaps", "services"]
  verbs: ["get", "list", "watch", "create", "update", "patch", "delete"]
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get", "list", "watch"]
- apiGroups: [""]
  resources: ["persistentvolumeclaims"]
  verbs: ["get", "list", "create", "update", "patch", "delete"]
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get"]
- apiGroups: [""]
  resources: ["events"]
  verbs: ["list", "create", "patch"]
- apiGroups: ["events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
- apiGroups: ["apps"]
  resources: ["deployments"]
  verbs: ["get", "list", "watch", "create", "update", "patch", "delete"]
# A ReplicaSet whose pods were refused (a ResourceQuota without room) is annotated so that the
# ReplicaSet controller tries again at once, not at its backoff of up to ~17 minutes.
- apiGroups: ["apps"]
  resources: ["replicasets"]
  verbs: ["list", "patch"]
- apiGroups: ["policy"]
  resources: ["poddisruptionbudgets"]
  verbs: ["get", "list", "watch", "create", "update", "patch", "delete"]
- apiGroups: ["networking.k8s.io"]
  resources: ["networkpolicies"]
  verbs: ["get", "list", "create", "update", "patch", "delete"]
- apiGroups: ["monitoring.coreos.com"]
  resources: ["podmonitors"]
  verbs: ["get", "list", "create", "update", "patch", "delete"]
{{- end }}

{{/*
Port the operator serves /metrics, /healthz and /readyz on (its --metrics-port).
*/}}
{{- define "expertmesh.metricsContainerPort" -}}
8080
{{- end }}

{{/*
Labels of the bundled NATS server's objects: the chart's, with component nats.
*/}}
{{- define "expertmesh.natsLabels" -}}
helm.sh/chart: {{ include "expertmesh.chart" . }}
{{ include "expertmesh.natsSelectorLabels" . }}
app.kubernetes.io/version: {{ .Values.nats.image.tag | quote }}
app.kubernetes.io/component: nats
app.kubernetes.io/part-of: expertmesh
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/*
Labels that select the bundled NATS server's pod: name nats, not expertmesh, so that the
operator's Deployment selector (name expertmesh + instance) never matches it.
*/}}
{{- define "expertmesh.natsSelectorLabels" -}}
app.kubernetes.io/name: nats
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
The bundled NATS server's configuration (nats.conf), from values nats.*.
*/}}
{{- define "expertmesh.natsConfig" -}}
{{- $tls := .Values.nats.tls -}}
# nats-server configuration written by the expertmesh chart (values nats.*).
port: 4222
http_port: 8222
{{- $replicas := int .Values.nats.replicas }}
{{- if gt $replicas 1 }}
{{- $name := printf "%s-nats" (include "expertmesh.fullname" .) | trunc 63 | trimSuffix "-" }}
# A cluster of {{ $replicas }}: each server named after its pod, routes to every pod by its name
# in the headless Service (a route to itself is dropped by the server).
server_name: $POD_NAME
cluster {
  name: {{ $name }}
  port: 6222
  # Clients reconnect through the Service's name, not to pod addresses the server would
  # gossip (which a TLS certificate for the Service's name does not hold).
  no_advertise: true
  routes: [
    {{- range $i := until $replicas }}
    nats://{{ $name }}-{{ $i }}.{{ $name }}.{{ $.Release.Namespace }}.svc:6222
    {{- end }}
  ]
  {{- if $tls.routesSecretName }}
  # Routes over TLS, verified both ways (a server's certificate holds the pods' names).
  tls {
    cert_file: "/etc/nats/routes-tls/tls.crt"
    key_file: "/etc/nats/routes-tls/tls.key"
    ca_file: "/etc/nats/routes-tls/ca.crt"
    timeout: 2
  }
  {{- end }}
}
{{- end }}
{{- if include "expertmesh.natsReloader" . }}
# Where the reloader (a second container) finds the server to signal.
pid_file: "/var/run/nats/nats.pid"
{{- end }}
max_payload: {{ int .Values.nats.maxPayload }}
{{- if .Values.nats.jetstream.enabled }}
jetstream {
  store_dir: "/data/jetstream"
  max_file_store: {{ .Values.nats.jetstream.maxFileStore }}
  max_memory_store: {{ .Values.nats.jetstream.maxMemoryStore }}
}
{{- end }}
{{- if $tls.secretName }}
tls {
  cert_file: "/etc/nats/tls/tls.crt"
  key_file: "/etc/nats/tls/tls.key"
  {{- if $tls.verifyClients }}
  ca_file: "/etc/nats/tls/ca.crt"
  verify: true
  {{- end }}
  timeout: 2
}
{{- end }}
{{- if .Values.nats.auth.configSecret }}
# Who may connect: the Secret's auth.conf (an authorization block), mounted at /etc/nats/auth.
include "../auth/auth.conf"
{{- end }}
{{- end }}

{{/*
The NATS reloader's script (values nats.reloader.*): every `interval` seconds it digests the
files of the folders given (the mounted auth Secret and TLS Secrets; the kubelet swaps a
Secret's files when it changes) and, when the digest moved, has the server reload its
configuration (`nats-server --signal reload=PIDFILE`: users, passwords, NKEYs, permissions
and certificates change in place, connections stay). A reload that fails (no server yet) is
tried again at the next turn. "true" when the pod runs one: there is a Secret to watch.
*/}}
{{- define "expertmesh.natsReloader" -}}
{{- if and .Values.nats.reloader.enabled (or .Values.nats.auth.configSecret .Values.nats.tls.secretName .Values.nats.tls.routesSecretName) }}true{{ end }}
{{- end }}

{{/*
The reloader's shell script; its arguments: PIDFILE INTERVAL DIR...
*/}}
{{- define "expertmesh.natsReloaderScript" -}}
pidfile=$1; interval=$2; shift 2
digest() { for d in "$@"; do cat "$d"/* 2>/dev/null; done | sha256sum; }
seen=$(digest "$@")
echo "watching $* every ${interval}s"
while true; do
  sleep "$interval"
  now=$(digest "$@")
  [ "$now" = "$seen" ] && continue
  if nats-server --signal "reload=$pidfile"; then
    echo "files changed: reloaded the server's configuration"
    seen=$now
  else
    echo "files changed, but the reload failed: trying again in ${interval}s"
  fi
done
{{- end }}
