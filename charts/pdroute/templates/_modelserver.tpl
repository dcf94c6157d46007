{{/*
One model-server Deployment. Called with (dict "root" $ "role" "prefill"|"decode").
prefill: vLLM serves the pool's target port directly.
decode (disaggregated): the pdroute sidecar (native sidecar) serves the target port and
  forwards to vLLM on sidecar.vllmPort; it runs the remote prefill leg first.
decode (aggregated): vLLM serves the target port, no sidecar.
*/}}
{{- define "pdroute.modelServer" -}}
{{- $root := .root -}}
{{- $ms := $root.Values.modelServers -}}
{{- $r := index $ms .role -}}
{{- $isDecode := eq .role "decode" -}}
{{- $sidecar := and $isDecode $ms.disaggregated -}}
{{- $name := ternary (include "pdroute.decodeName" $root) (include "pdroute.prefillName" $root) $isDecode -}}
{{- $roleLabel := ternary (include "pdroute.decodeRole" $root) "prefill" $isDecode -}}
{{- $targetPort := int (first $root.Values.pool.targetPorts) -}}
{{- $port := ternary (int $ms.sidecar.vllmPort) $targetPort $sidecar -}}
{{- $served := include "pdroute.servedModelName" $root -}}
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ $name }}
  namespace: {{ $root.Release.Namespace }}
  labels:
    {{- include "pdroute.labels" $root | nindent 4 }}
    app.kubernetes.io/component: {{ .role }}
    llm-d.ai/role: {{ $roleLabel }}
spec:
  {{- if not $r.autoscaling.enabled }}
  replicas: {{ int $r.replicas }}
  {{- end }}
  selector:
    matchLabels:
      {{- include "pdroute.poolMatchLabels" $root | nindent 6 }}
      llm-d.ai/role: {{ $roleLabel }}
  template:
    metadata:
      labels:
        {{- include "pdroute.poolMatchLabels" $root | nindent 8 }}
        llm-d.ai/role: {{ $roleLabel }}
        app.kubernetes.io/instance: {{ $root.Release.Name }}
        app.kubernetes.io/component: {{ .role }}
    spec:
      serviceAccountName: {{ include "pdroute.modelServerSA" $root }}
      automountServiceAccountToken: {{ $sidecar }}
      terminationGracePeriodSeconds: 60
      {{- with $root.Values.imagePullSecrets }}
      imagePullSecrets:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- if $sidecar }}
      initContainers:
      # Native sidecar: starts before vLLM, stops after it, restarts on its own.
      - name: sidecar
        image: {{ include "pdroute.image" $root }}
        imagePullPolicy: {{ $root.Values.image.pullPolicy }}
        restartPolicy: Always
        command: [pdroute, sidecar]
        args:
        - --port={{ int $ms.sidecar.port }}
        - --vllm-port={{ int $ms.sidecar.vllmPort }}
        - --metrics-port={{ int $ms.sidecar.metricsPort }}
        # SSRF protection: prefill legs only go to members of this pool.
        - --inference-pool={{ $root.Release.Namespace }}/{{ include "pdroute.poolName" $root }}
        {{- range $ms.sidecar.extraArgs }}
        - {{ . | quote }}
        {{- end }}
        env:
        - name: POD_IP
          valueFrom:
            fieldRef:
              fieldPath: status.podIP
        - name: NAMESPACE
          valueFrom:
            fieldRef:
              fieldPath: metadata.namespace
        ports:
        - name: proxy
          containerPort: {{ int $ms.sidecar.port }}
          protocol: TCP
        - name: sidecar-metrics
          containerPort: {{ int $ms.sidecar.metricsPort }}
          protocol: TCP
        readinessProbe:
          tcpSocket:
            port: proxy
          periodSeconds: 5
        resources:
          {{- toYaml $ms.sidecar.resources | nindent 10 }}
        volumeMounts:
        - name: tmp
          mountPath: /tmp
        securityContext:
          runAsNonRoot: true
          runAsUser: 65532
          allowPrivilegeEscalation: false
          readOnlyRootFilesystem: true
          capabilities:
            drop: [ALL]
      {{- end }}
      containers:
      {{- if eq $ms.mode "sim" }}
      - name: sim
        image: {{ include "pdroute.image" $root }}
        imagePullPolicy: {{ $root.Values.image.pullPolicy }}
        command: [pdroute, sim]
        args:
        - --host=0.0.0.0
        - --port={{ $port }}
        - --advertise-host=$(POD_IP)
        - {{ printf "--model=%s" $served | quote }}
        - --role={{ ternary .role "both" $ms.disaggregated }}
        - --block-size={{ int $ms.blockSize }}
        - --side-channel-port={{ int $ms.vllm.nixlSideChannelPort }}
        {{- range $ms.sim.extraArgs }}
        - {{ . | quote }}
        {{- end }}
        env:
        - name: POD_IP
          valueFrom:
            fieldRef:
              fieldPath: status.podIP
        volumeMounts:
        - name: tmp
          mountPath: /tmp
        securityContext:
          runAsNonRoot: true
          runAsUser: 65532
          allowPrivilegeEscalation: false
          readOnlyRootFilesystem: true
          capabilities:
            drop: [ALL]
      {{- else }}
      - name: vllm
        image: {{ printf "%s:%s" $ms.vllm.image.repository $ms.vllm.image.tag }}
        imagePullPolicy: {{ $ms.vllm.image.pullPolicy }}
        command: [vllm, serve]
        args:
        - {{ $ms.model | quote }}
        - --port={{ $port }}
        - {{ printf "--served-model-name=%s" $served | quote }}
        - --block-size={{ int $ms.blockSize }}
        - --tensor-parallel-size={{ int $r.tensorParallelSize }}
        - --data-parallel-size={{ int $r.dataParallelSize }}
        {{- if $r.enableExpertParallel }}
        - --enable-expert-parallel
        {{- end }}
        {{- if $ms.disaggregated }}
        - {{ printf "--kv-transfer-config=%s" (toJson $ms.vllm.kvTransferConfig) | quote }}
        {{- end }}
        {{- range (concat $ms.vllm.extraArgs $r.extraArgs) }}
        - {{ . | quote }}
        {{- end }}
        env:
        - name: POD_IP
          valueFrom:
            fieldRef:
              fieldPath: status.podIP
        # NIXL's side channel must advertise the pod IP, not localhost.
        - name: VLLM_NIXL_SIDE_CHANNEL_HOST
          valueFrom:
            fieldRef:
              fieldPath: status.podIP
        - name: VLLM_NIXL_SIDE_CHANNEL_PORT
          value: {{ $ms.vllm.nixlSideChannelPort | quote }}
        {{- with (concat $ms.vllm.env $r.env) }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
        volumeMounts:
        - name: shm
          mountPath: /dev/shm
        - name: cache
          mountPath: /root/.cache
      {{- end }}
        ports:
        - name: http
          containerPort: {{ $port }}
          protocol: TCP
        - name: nixl
          containerPort: {{ int $ms.vllm.nixlSideChannelPort }}
          protocol: TCP
        # Model loading can take many minutes; liveness starts only after startup.
        startupProbe:
          httpGet:
            path: /health
            port: http
          periodSeconds: 5
          failureThreshold: 360
        readinessProbe:
          httpGet:
            path: /health
            port: http
          periodSeconds: 5
          failureThreshold: 2
        livenessProbe:
          httpGet:
            path: /health
            port: http
          periodSeconds: 10
          failureThreshold: 6
        {{- with $r.resources }}
        resources:
          {{- toYaml . | nindent 10 }}
        {{- end }}
      volumes:
      - name: tmp
        emptyDir: {}
      {{- if eq $ms.mode "vllm" }}
      - name: shm
        emptyDir:
          medium: Memory
          sizeLimit: {{ $r.shmSize }}
      - name: cache
        emptyDir: {}
      {{- end }}
      {{- with $r.nodeSelector }}
      nodeSelector:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $r.tolerations }}
      tolerations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $r.affinity }}
      affinity:
        {{- toYaml . | nindent 8 }}
      {{- end }}
{{- end -}}

{{/*
Per-role autoscaling on the EPP's pool signals. Called like pdroute.modelServer.
prefill scales on waiting requests, decode on KV-cache utilization (both averaged by the
EPP over the role's ready endpoints).
*/}}
{{- define "pdroute.autoscaler" -}}
{{- $root := .root -}}
{{- $ms := $root.Values.modelServers -}}
{{- $r := index $ms .role -}}
{{- $a := $r.autoscaling -}}
{{- $isDecode := eq .role "decode" -}}
{{- $name := ternary (include "pdroute.decodeName" $root) (include "pdroute.prefillName" $root) $isDecode -}}
{{- $roleLabel := ternary (include "pdroute.decodeRole" $root) "prefill" $isDecode -}}
{{- $metric := ternary "llm_d_epp_pool_average_kv_cache_utilization" "llm_d_epp_pool_average_queue_size" $isDecode -}}
{{- if eq $a.engine "keda" }}
apiVersion: keda.sh/v1alpha1
kind: ScaledObject
metadata:
  name: {{ $name }}
  namespace: {{ $root.Release.Namespace }}
  labels:
    {{- include "pdroute.labels" $root | nindent 4 }}
    app.kubernetes.io/component: {{ .role }}
spec:
  scaleTargetRef:
    apiVersion: apps/v1
    kind: Deployment
    name: {{ $name }}
  minReplicaCount: {{ int $a.minReplicas }}
  maxReplicaCount: {{ int $a.maxReplicas }}
  pollingInterval: 15
  cooldownPeriod: 300
  triggers:
  - type: prometheus
    metricType: Value
    metadata:
      serverAddress: {{ $a.prometheusAddress }}
      # max(): with HA only the leader's gauges are current; all replicas export them.
      query: max({{ $metric }}{namespace="{{ $root.Release.Namespace }}",service="{{ include "pdroute.eppName" $root }}",role="{{ $roleLabel }}"})
      threshold: {{ $a.target | quote }}
{{- else }}
apiVersion: autoscaling/v2
kind: HorizontalPodAutoscaler
metadata:
  name: {{ $name }}
  namespace: {{ $root.Release.Namespace }}
  labels:
    {{- include "pdroute.labels" $root | nindent 4 }}
    app.kubernetes.io/component: {{ .role }}
spec:
  scaleTargetRef:
    apiVersion: apps/v1
    kind: Deployment
    name: {{ $name }}
  minReplicas: {{ int $a.minReplicas }}
  maxReplicas: {{ int $a.maxReplicas }}
  # The signal is already a per-pod average: desired = ceil(current * value / target).
  metrics:
  - type: External
    external:
      metric:
        name: {{ $metric }}
        selector:
          matchLabels:
            role: {{ $roleLabel }}
            service: {{ include "pdroute.eppName" $root }}
      target:
        type: Value
        value: {{ $a.target | quote }}
  behavior:
    scaleDown:
      stabilizationWindowSeconds: 300
{{- end }}
{{- end -}}
