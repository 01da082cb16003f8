"""Example policies (the demo's; also a starting point for users)."""

#: For ``flowscope demo`` (pods in namespace ``demo`` labelled app=frontend|api|db|batch): frontend may call
#: api:8080, api may use db:5432/TCP and db:53/UDP; nothing else reaches api or db, and batch is explicitly
#: denied towards db (its pings and probes show up as drops: POLICY_DENY for db, POLICY_DENIED for api).
DEMO_POLICIES = """\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: api-from-frontend
  namespace: demo
spec:
  description: only the frontend reaches the api, on 8080
  endpointSelector:
    matchLabels: {app: api}
  ingress:
  - fromEndpoints:
    - matchLabels: {app: frontend}
    toPorts:
    - ports:
      - {port: "8080", protocol: TCP}
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: db-from-api
  namespace: demo
spec:
  description: only the api reaches the db, on 5432/TCP and 53/UDP
  endpointSelector:
    matchLabels: {app: db}
  ingress:
  - fromEndpoints:
    - matchLabels: {app: api}
    toPorts:
    - ports:
      - {port: "5432", protocol: TCP}
      - {port: "53", protocol: UDP}
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: deny-batch-to-db
  namespace: demo
spec:
  description: batch jobs never talk to the db (explicit deny, wins over any allow)
  endpointSelector:
    matchLabels: {app: db}
  ingressDeny:
  - fromEndpoints:
    - matchLabels: {app: batch}
"""
