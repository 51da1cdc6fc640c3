"""The Kubernetes "restricted" Pod Security Standard, and this project's own rules, on the pod
templates of the given manifests (run by scripts/check-deploy.sh with the kubernetes-validate
venv's Python, which has PyYAML).

Restricted (https://kubernetes.io/docs/concepts/security/pod-security-standards/): no host
namespaces or host paths, non-root, seccomp RuntimeDefault or Localhost, no privilege
escalation, every capability dropped (NET_BIND_SERVICE the only one added back), not
privileged. Ours: a read-only root file system, ttlSecondsAfterFinished on Jobs, and no
container port that is another well-known service's (Prometheus 9090, node_exporter 9100).
"""
import sys

import yaml

TAKEN = {9090: "Prometheus", 9100: "node_exporter"}


def check(doc, where):
    problems = []
    kind = doc.get("kind")
    if kind not in ("Job", "Deployment", "StatefulSet", "DaemonSet", "Pod"):
        return problems
    if kind == "Job" and "ttlSecondsAfterFinished" not in doc["spec"]:
        problems.append("no spec.ttlSecondsAfterFinished")
    pod = doc["spec"] if kind == "Pod" else doc["spec"]["template"]["spec"]
    for host in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(host):
            problems.append(f"{host}: true")
    for v in pod.get("volumes", []):
        if "hostPath" in v:
            problems.append(f"volume {v['name']} is a hostPath")
    psc = pod.get("securityContext", {})
    seccomp = psc.get("seccompProfile", {}).get("type")
    for c in pod.get("initContainers", []) + pod["containers"]:
        name = f"container {c['name']}"
        sc = c.get("securityContext", {})
        if not (sc.get("runAsNonRoot", psc.get("runAsNonRoot")) is True):
            problems.append(f"{name}: runAsNonRoot is not true")
        if sc.get("runAsUser", psc.get("runAsUser")) == 0:
            problems.append(f"{name}: runs as uid 0")
        if sc.get("seccompProfile", {}).get("type", seccomp) not in ("RuntimeDefault", "Localhost"):
            problems.append(f"{name}: seccompProfile is not RuntimeDefault or Localhost")
        if sc.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{name}: allowPrivilegeEscalation is not false")
        if sc.get("privileged"):
            problems.append(f"{name}: privileged")
        caps = sc.get("capabilities", {})
        if "ALL" not in caps.get("drop", []):
            problems.append(f"{name}: capabilities do not drop ALL")
        added = set(caps.get("add", [])) - {"NET_BIND_SERVICE"}
        if added:
            problems.append(f"{name}: adds capabilities {sorted(added)}")
        if sc.get("readOnlyRootFilesystem") is not True:
            problems.append(f"{name}: the root file system is writable")
        for p in c.get("ports", []):
            if p.get("containerPort") in TAKEN:
                problems.append(f"{name}: port {p['containerPort']} is {TAKEN[p['containerPort']]}'s")
    return [f"{where}: {kind} {doc['metadata']['name']}: {p}" for p in problems]


def main(paths):
    problems = []
    for path in paths:
        with open(path) as f:
            for doc in yaml.safe_load_all(f):
                if doc:
                    problems += check(doc, path)
    for p in problems:
        print(p, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
