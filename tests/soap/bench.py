"""Times one retrieval of every VM's name, power state and devices, through the SOAP API
(pyvmomi: one container view, RetrievePropertiesEx paged by maxObjects, then
ContinueRetrievePropertiesEx) or through REST (GET /api/vcenter/vm, then
GET /api/vcenter/vm/{vm} for each VM's devices), as a script would. tests/soap-bench.sh
runs it; prints one JSON line.

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
    from pyVmomi import vim, vmodl
    si = SmartConnect(host=host, port=int(port), user=user, pwd=password,
                      sslContext=ssl.create_default_context(cafile=ca))
    content = si.RetrieveContent()
    pc = content.propertyCollector
    times, vms, devices = [], 0, 0
    for _ in range(rounds):
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
    Disconnect(si)
    return times, vms, devices


def rest():
    import requests
    s = requests.Session()
    s.verify = ca
    base = f"https://{server}"
    r = s.post(f"{base}/api/session", auth=(user, password))
    r.raise_for_status()
    s.headers["vmware-api-session-id"] = r.json()
    times, vms, devices = [], 0, 0
    for _ in range(rounds):
        t0 = time.perf_counter()
        listing = s.get(f"{base}/api/vcenter/vm").json()
        vms = devices = 0
        for summary in listing:
            vm = s.get(f"{base}/api/vcenter/vm/{summary['vm']}").json()
            vms += 1
            devices += (len(vm["disks"]) + len(vm["nics"]) + len(vm["scsi_adapters"])
                        + len(vm["sata_adapters"]) + len(vm["nvme_adapters"]))
        times.append(time.perf_counter() - t0)
    s.delete(f"{base}/api/session")
    return times, vms, devices


times, vms, devices = soap() if mode == "soap" else rest()
print(json.dumps({"mode": mode, "vms": vms, "devices": devices, "seconds": times,
                  "best": min(times), "median": sorted(times)[len(times) // 2]}))
