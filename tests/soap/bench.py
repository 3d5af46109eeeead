"""Times one retrieval of every VM's name, power state and devices, through the SOAP API
(pyvmomi: one container view, RetrievePropertiesEx paged by maxObjects, then
ContinueRetrievePropertiesEx) or through REST (GET /api/vcenter/vm, then
GET /api/vcenter/vm/{vm} for each VM's devices), as a script would. tests/soap-bench.sh
runs it; prints one JSON line. In SOAP mode it also times pyvmomi's parsing of the
responses into Python objects apart (`parse_seconds`): each response is read whole, then
parsed, where pyvmomi parses while it reads; the sum is the same work.

usage: bench.py soap|rest HOST:PORT CA USER PASSWORD PAGE ROUNDS"""

import json
import ssl
import sys
import time

mode, server, ca, user, password, page, rounds = sys.argv[1:8]
page, rounds = int(page), int(rounds)
host, port = server.rsplit(":", 1)


def soap():
    from pyVim.connect import SmartConnect, Disconnect
    from pyVmomi import vim, vmodl, SoapAdapter
    parse = [0.0]
    deserialize = SoapAdapter.SoapResponseDeserializer.Deserialize

    def timed(self, response, result_type, ns_map=None):
        body = response.read() if hasattr(response, "read") else response
        t0 = time.perf_counter()
        try:
            return deserialize(self, body, result_type, ns_map)
        finally:
            parse[0] += time.perf_counter() - t0

    SoapAdapter.SoapResponseDeserializer.Deserialize = timed
    si = SmartConnect(host=host, port=int(port), user=user, pwd=password,
                      sslContext=ssl.create_default_context(cafile=ca))
    content = si.RetrieveContent()
    pc = content.propertyCollector
    times, parses, vms, devices = [], [], 0, 0
    for _ in range(rounds):
        parse[0] = 0.0
        t0 = time.perf_counter()
        view = content.viewManager.CreateContainerView(content.rootFolder, [vim.VirtualMachine], True)
        spec = vmodl.query.PropertyCollector.FilterSpec(
            objectSet=[vmodl.query.PropertyCollector.ObjectSpec(obj=view, skip=True, selectSet=[
                vmodl.query.PropertyCollector.TraversalSpec(type=vim.view.ContainerView, path="view")])],
            propSet=[vmodl.query.PropertyCollector.PropertySpec(
                type=vim.VirtualMachine, pathSet=["name", "runtime.powerState", "config.hardware.device"])])
        vms = devices = 0
        result = pc.RetrievePropertiesEx([spec], vmodl.query.PropertyCollector.RetrieveOptions(maxObjects=page))
        while result:
            for oc in result.objects:
                vms += 1
                for p in oc.propSet:
                    if p.name == "config.hardware.device":
                        devices += len(p.val)
            result = pc.ContinueRetrievePropertiesEx(result.token) if result.token else None
        view.DestroyView()
        times.append(time.perf_counter() - t0)
        parses.append(parse[0])
    Disconnect(si)
    return times, parses, vms, devices


def rest():
    # http.client on one kept-alive connection with the same TLS context as pyvmomi's, so
    # both sides pay the same per-request costs.
    import base64
    import http.client
    conn = http.client.HTTPSConnection(host, int(port), context=ssl.create_default_context(cafile=ca))

    def call(method, path, headers):
        conn.request(method, path, headers=headers)
        r = conn.getresponse()
        body = r.read()
        if r.status >= 300:
            raise RuntimeError(f"{method} {path}: {r.status} {body[:200]!r}")
        return json.loads(body) if body else None

    basic = base64.b64encode(f"{user}:{password}".encode()).decode()
    token = call("POST", "/api/session", {"Authorization": f"Basic {basic}"})
    h = {"vmware-api-session-id": token}
    times, vms, devices = [], 0, 0
    for _ in range(rounds):
        t0 = time.perf_counter()
        listing = call("GET", "/api/vcenter/vm", h)
        vms = devices = 0
        for summary in listing:
            vm = call("GET", f"/api/vcenter/vm/{summary['vm']}", h)
            vms += 1
            devices += (len(vm["disks"]) + len(vm["nics"]) + len(vm["scsi_adapters"])
                        + len(vm["sata_adapters"]) + len(vm["nvme_adapters"]))
        times.append(time.perf_counter() - t0)
    call("DELETE", "/api/session", h)
    return times, [], vms, devices


times, parses, vms, devices = soap() if mode == "soap" else rest()
median = sorted(range(len(times)), key=times.__getitem__)[len(times) // 2]
print(json.dumps({"mode": mode, "vms": vms, "devices": devices, "seconds": times,
                  "best": min(times), "median": times[median],
                  "parse_seconds": parses, "median_parse": parses[median] if parses else None}))
