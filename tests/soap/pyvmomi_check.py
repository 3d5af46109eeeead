"""What a pyvmomi user does against the cloud endpoint's vim25 SOAP API at /sdk, checked
against what REST answered for the same domain (the JSON file given as argv[1], written
by tests/tests/soap.rs). Prints "all pyvmomi checks passed" at the end; any failed check
raises with what was expected."""

import json
import ssl
import sys

from pyVim.connect import SmartConnect, Disconnect
from pyVim.task import WaitForTask
from pyVmomi import vim, vmodl, SoapStubAdapter

exp = json.load(open(sys.argv[1]))
host, port = exp["server"].rsplit(":", 1)
ctx = ssl.create_default_context(cafile=exp["ca"])


def check(cond, what):
    if not cond:
        raise AssertionError(what)
    print("ok:", what.split(":")[0])


def expect_fault(kind, call, what):
    try:
        call()
    except kind as e:
        print("ok:", what, "->", type(e).__name__, "-", e.msg)
        return e
    raise AssertionError(f"{what}: expected {kind.__name__}, no fault")


def connect(user):
    return SmartConnect(host=host, port=int(port), user=user, pwd=exp["password"], sslContext=ctx)


# --- connect and the service content --------------------------------------------------
si = connect(exp["auditor"])
content = si.RetrieveContent()
about = content.about
check(about.apiType == "VirtualCenter", f"about.apiType: {about.apiType}")
check(about.apiVersion.startswith("8.0"), f"about.apiVersion: {about.apiVersion}")
check(len(about.instanceUuid) == 36, f"about.instanceUuid: {about.instanceUuid}")
check(content.sessionManager.currentSession.userName == exp["auditor"],
      f"currentSession.userName: {content.sessionManager.currentSession.userName}")
check(isinstance(si.CurrentTime(), __import__("datetime").datetime), "CurrentTime answers a time")

# --- the inventory through a container view -------------------------------------------
view = content.viewManager.CreateContainerView(content.rootFolder, [vim.VirtualMachine], True)
vms = {vm._moId: vm for vm in view.view}
check(sorted(vms) == sorted(exp["vms"]), f"container view VMs: {sorted(vms)} vs {sorted(exp['vms'])}")
for moid, vm in vms.items():
    check(vm.name == exp["vms"][moid]["name"], f"name of {moid}: {vm.name}")

pc = content.propertyCollector
trav = vmodl.query.PropertyCollector.TraversalSpec(name="v", type=vim.view.ContainerView, path="view", skip=False)
spec = vmodl.query.PropertyCollector.FilterSpec(
    objectSet=[vmodl.query.PropertyCollector.ObjectSpec(obj=view, skip=True, selectSet=[trav])],
    propSet=[vmodl.query.PropertyCollector.PropertySpec(
        type=vim.VirtualMachine, pathSet=["name", "runtime.powerState", "config.hardware.device"])],
)
pages, seen = 0, {}
result = pc.RetrievePropertiesEx([spec], vmodl.query.PropertyCollector.RetrieveOptions(maxObjects=1))
while result:
    pages += 1
    for oc in result.objects:
        props = {p.name: p.val for p in oc.propSet}
        seen[oc.obj._moId] = props
    result = pc.ContinueRetrievePropertiesEx(result.token) if result.token else None
check(pages == len(exp["vms"]), f"one VM a page with maxObjects=1: {pages} pages")
check(sorted(seen) == sorted(exp["vms"]), f"paged retrieval VMs: {sorted(seen)}")
for moid, props in seen.items():
    check(props["runtime.powerState"] == "poweredOff", f"{moid} powerState: {props['runtime.powerState']}")
    check(all(isinstance(d, vim.vm.device.VirtualDevice) for d in props["config.hardware.device"]),
          f"{moid} devices are typed")
expect_fault(vmodl.query.InvalidProperty, lambda: pc.RetrievePropertiesEx([vmodl.query.PropertyCollector.FilterSpec(
    objectSet=[vmodl.query.PropertyCollector.ObjectSpec(obj=view, skip=True, selectSet=[trav])],
    propSet=[vmodl.query.PropertyCollector.PropertySpec(type=vim.VirtualMachine, pathSet=["noSuchProperty"])])],
    vmodl.query.PropertyCollector.RetrieveOptions()), "a path no VM has")
# A misspelled step anywhere in a path is refused, with the whole path as its name.
for path in ["config.hardwre.device", "summary.confg.name", "config.hardware.device.key"]:
    e = expect_fault(vmodl.query.InvalidProperty, lambda: pc.RetrievePropertiesEx([vmodl.query.PropertyCollector.FilterSpec(
        objectSet=[vmodl.query.PropertyCollector.ObjectSpec(obj=view, skip=True, selectSet=[trav])],
        propSet=[vmodl.query.PropertyCollector.PropertySpec(type=vim.VirtualMachine, pathSet=["name", path])])],
        vmodl.query.PropertyCollector.RetrieveOptions()), f"the misspelled path {path}")
    check(e.name == path, f"InvalidProperty.name: {e.name}")
# A path vim25 has that is not set here is left out, not refused.
unset = pc.RetrievePropertiesEx([vmodl.query.PropertyCollector.FilterSpec(
    objectSet=[vmodl.query.PropertyCollector.ObjectSpec(obj=view, skip=True, selectSet=[trav])],
    propSet=[vmodl.query.PropertyCollector.PropertySpec(type=vim.VirtualMachine,
                                                        pathSet=["name", "config.cpuAllocation.limit"])])],
    vmodl.query.PropertyCollector.RetrieveOptions())
check(all([p.name for p in oc.propSet] == ["name"] for oc in unset.objects),
      "an unset vim25 path is left out")
view.DestroyView()

# --- the migrations as Tasks ------------------------------------------------------------
recent = {t._moId for t in content.taskManager.recentTask}
check(set(exp["migrations"]) <= recent, f"recentTask lists the migrations: {sorted(recent)}")
for mid, vm_id in exp["migrations"].items():
    task = vim.Task(mid, si._stub)
    info = task.info
    check(info.key == mid and info.task._moId == mid, f"{mid} info.key and info.task")
    check(info.state == "success", f"{mid} state: {info.state}")
    check(isinstance(info.entity, vim.VirtualMachine) and info.entity._moId == vm_id,
          f"{mid} entity: {info.entity}")
    check(info.entityName == exp["vms"][vm_id]["name"], f"{mid} entityName: {info.entityName}")
    check(info.result._moId == vm_id, f"{mid} result: {info.result}")
    check(info.descriptionId == "VirtualMachine.relocate", f"{mid} descriptionId: {info.descriptionId}")
    check(info.error is None and not info.cancelable, f"{mid} no error, not cancelable")
    check(info.queueTime <= info.startTime <= info.completeTime, f"{mid} times: {info.queueTime} {info.completeTime}")
    check(info.reason.userName == exp["migrator"], f"{mid} reason.userName: {info.reason.userName}")
    check(WaitForTask(task) == "success", f"{mid} WaitForTask")
check(len(content.taskManager.description.methodInfo) > 0, "TaskManager.description.methodInfo")

# --- the inventory through traversal specs from the root folder -----------------------
TS, SS = vmodl.query.PropertyCollector.TraversalSpec, vmodl.query.PropertyCollector.SelectionSpec
select = [SS(name=n) for n in ["folder", "dcVm", "dcHost", "dcDs", "dcNet", "crHost", "crRp", "rpRp", "hostVm"]]
specs = [
    TS(name="folder", type=vim.Folder, path="childEntity", selectSet=select),
    TS(name="dcVm", type=vim.Datacenter, path="vmFolder", selectSet=select),
    TS(name="dcHost", type=vim.Datacenter, path="hostFolder", selectSet=select),
    TS(name="dcDs", type=vim.Datacenter, path="datastoreFolder", selectSet=select),
    TS(name="dcNet", type=vim.Datacenter, path="networkFolder", selectSet=select),
    TS(name="crHost", type=vim.ComputeResource, path="host", selectSet=select),
    TS(name="crRp", type=vim.ComputeResource, path="resourcePool", selectSet=select),
    TS(name="rpRp", type=vim.ResourcePool, path="resourcePool", selectSet=select),
    TS(name="hostVm", type=vim.HostSystem, path="vm", selectSet=select),
]
walk = vmodl.query.PropertyCollector.FilterSpec(
    objectSet=[vmodl.query.PropertyCollector.ObjectSpec(obj=content.rootFolder, skip=False, selectSet=specs)],
    propSet=[vmodl.query.PropertyCollector.PropertySpec(type=vim.ManagedEntity, pathSet=["name", "parent"])],
)
found = {}
for oc in pc.RetrieveContents([walk]):
    found[oc.obj._moId] = (type(oc.obj).__name__, {p.name: p.val for p in oc.propSet})
kinds = sorted({k for k, _ in found.values()})
check({"vim.Folder", "vim.Datacenter", "vim.ClusterComputeResource", "vim.HostSystem", "vim.ResourcePool",
       "vim.Datastore", "vim.Network", "vim.VirtualMachine"} <= set(kinds), f"walk reaches every kind: {kinds}")
check(all(m in found for m in exp["vms"]), "walk reaches every VM")
check(content.rootFolder._moId in found and "parent" not in found[content.rootFolder._moId][1],
      "the root folder has no parent")
for ds in exp["datastores"]:
    check(ds in found, f"walk reaches datastore {ds}")
walk.objectSet[0].skip = True
check(content.rootFolder._moId not in {oc.obj._moId for oc in pc.RetrieveContents([walk])}, "skip leaves the root out")

# --- every VM's disks and NICs ---------------------------------------------------------
for moid, want in exp["vms"].items():
    vm = vim.VirtualMachine(moid, si._stub)
    devices = vm.config.hardware.device
    disks = [d for d in devices if isinstance(d, vim.vm.device.VirtualDisk)]
    nics = [d for d in devices if isinstance(d, vim.vm.device.VirtualEthernetCard)]
    controllers = {d.key for d in devices if isinstance(d, vim.vm.device.VirtualController)}
    check([d.backing.fileName for d in disks] == [w["file"] for w in want["disks"]],
          f"{moid} disk files: {[d.backing.fileName for d in disks]}")
    check([d.backing.datastore._moId for d in disks] == [w["datastore"] for w in want["disks"]],
          f"{moid} disk datastores")
    check(all(d.controllerKey in controllers for d in disks), f"{moid} disks sit on listed controllers")
    check([n.macAddress for n in nics] == [w["mac"] for w in want["nics"]], f"{moid} NIC MACs: {[n.macAddress for n in nics]}")
    check([n.backing.network._moId for n in nics] == [w["network"] for w in want["nics"]], f"{moid} NIC networks")
    check(vm.config.instanceUuid == want["instance_uuid"], f"{moid} instanceUuid")
    check(vm.summary.config.name == want["name"] and vm.summary.runtime.powerState == "poweredOff",
          f"{moid} summary")
    check(vm.config.guestId.endswith("Guest"), f"{moid} guestId {vm.config.guestId}")
    # Find it again: by uuid, by instance uuid, by inventory path, as a child of its folder.
    search = content.searchIndex
    # The test's sources share one BIOS uuid (as clones do): a VM with that uuid is found,
    # and FindAllByUuid finds each of them.
    check(search.FindByUuid(None, vm.config.uuid, True).config.uuid == vm.config.uuid, f"{moid} FindByUuid")
    check(search.FindByUuid(None, vm.config.instanceUuid, True, True)._moId == moid, f"{moid} FindByUuid instance")
    same = [v._moId for v in search.FindAllByUuid(None, vm.config.uuid, True)]
    want = sorted(m for m in exp["vms"] if vim.VirtualMachine(m, si._stub).config.uuid == vm.config.uuid)
    check(sorted(same) == want and len(want) == len(exp["vms"]), f"{moid} FindAllByUuid: {same}")
    check([v._moId for v in search.FindAllByUuid(None, vm.config.instanceUuid, True, True)] == [moid],
          f"{moid} FindAllByUuid instance")
    path, at = [], vm
    while at is not None:
        path.append(at.name)
        at = at.parent
    inventory_path = "/".join(reversed(path[:-1]))  # without the root folder
    check(search.FindByInventoryPath(inventory_path)._moId == moid, f"{moid} FindByInventoryPath {inventory_path}")
    check(search.FindChild(vm.parent, vm.name)._moId == moid, f"{moid} FindChild")
check(content.searchIndex.FindByInventoryPath("no/such/path") is None, "an unknown path finds nothing")
check(content.searchIndex.FindAllByUuid(None, "00000000-0000-0000-0000-000000000000", True) == [],
      "an unknown uuid finds no VM")

# Hosts by their hardware uuid.
for host_id in exp["hosts"]:
    host_system = vim.HostSystem(host_id, si._stub)
    uuid = host_system.hardware.systemInfo.uuid
    check(len(uuid) == 36 and host_system.summary.hardware.uuid == uuid, f"{host_id} uuid {uuid}")
    found = content.searchIndex.FindByUuid(None, uuid, False)
    check(isinstance(found, vim.HostSystem) and found._moId == host_id, f"{host_id} FindByUuid: {found}")
    check([h._moId for h in content.searchIndex.FindAllByUuid(None, uuid.upper(), False)] == [host_id],
          f"{host_id} FindAllByUuid")
    check(content.searchIndex.FindByUuid(None, uuid, True) is None, f"no VM has the uuid of {host_id}")

for ds_id in exp["datastores"]:
    ds = vim.Datastore(ds_id, si._stub)
    check(ds.summary.capacity > 0 and 0 <= ds.summary.freeSpace <= ds.summary.capacity,
          f"{ds_id} capacity {ds.summary.capacity} free {ds.summary.freeSpace}")
    check(all(isinstance(v, vim.VirtualMachine) for v in ds.vm), f"{ds_id} vm list")

# --- faults ------------------------------------------------------------------------------
e = expect_fault(vim.fault.NoPermission, lambda: vim.VirtualMachine(exp["boot_vm"], si._stub).PowerOnVM_Task(),
                 "a read-only user powers on")
check(e.privilegeId == "VirtualMachine.Interact.PowerOn", f"NoPermission.privilegeId: {e.privilegeId}")
expect_fault(vmodl.fault.ManagedObjectNotFound, lambda: vim.VirtualMachine("vm-999999", si._stub).name,
             "an unknown moref")
expect_fault(vmodl.fault.NotSupported, lambda: content.rootFolder.CreateFolder("new"), "an unimplemented method")
expect_fault(vim.fault.InvalidLogin,
             lambda: SmartConnect(host=host, port=int(port), user=exp["auditor"], pwd="wrong", sslContext=ctx),
             "a bad password")
anonymous = SoapStubAdapter(host=host, port=int(port), sslContext=ctx, version="vim.version.v8_0_3_0")
anon_si = vim.ServiceInstance("ServiceInstance", anonymous)
anon_content = anon_si.RetrieveContent()
expect_fault(vim.fault.NotAuthenticated, lambda: anon_content.rootFolder.name, "no session")
Disconnect(si)
expect_fault(vim.fault.NotAuthenticated, lambda: content.rootFolder.name, "a logged-out session")

# --- power a lifted VM on and off, waiting for each task -------------------------------
si = connect(exp["migrator"])
vm = vim.VirtualMachine(exp["boot_vm"], si._stub)
task = vm.PowerOnVM_Task()
check(isinstance(task, vim.Task), "PowerOnVM_Task returns a Task")
WaitForTask(task)
check(task.info.state == "success" and task.info.entity._moId == exp["boot_vm"], f"power-on task: {task.info.state}")
check(vm.runtime.powerState == "poweredOn", f"powered on: {vm.runtime.powerState}")
# The power-on and the migrations, side by side in recentTask, the newest last.
recent = [t._moId for t in si.RetrieveContent().taskManager.recentTask]
check(task._moId in recent and set(exp["migrations"]) <= set(recent), f"recentTask after a power-on: {recent}")
check(recent[-1] == task._moId, f"the power-on is the newest task: {recent}")
again = vm.PowerOnVM_Task()
try:
    WaitForTask(again)
    raise AssertionError("powering on a running VM should fail its task")
except vim.fault.InvalidPowerState as e:
    print("ok: a second power-on fails its task ->", e.msg)
check(again.info.state == "error" and again.info.error is not None, "the failed task's info.error")
# WaitForUpdatesEx, as govmomi and newer scripts wait.
pc = si.RetrieveContent().propertyCollector
task = vm.PowerOffVM_Task()
filt = pc.CreateFilter(vmodl.query.PropertyCollector.FilterSpec(
    objectSet=[vmodl.query.PropertyCollector.ObjectSpec(obj=task)],
    propSet=[vmodl.query.PropertyCollector.PropertySpec(type=vim.Task, pathSet=["info.state"])]), True)
version, state = "", None
for _ in range(100):
    update = pc.WaitForUpdatesEx(version, vmodl.query.PropertyCollector.WaitOptions(maxWaitSeconds=5))
    if update is None:
        continue
    version = update.version
    for fs in update.filterSet:
        for ou in fs.objectSet:
            for change in ou.changeSet:
                state = change.val
    if state in ("success", "error"):
        break
filt.DestroyPropertyFilter()
check(state == "success", f"power-off task through WaitForUpdatesEx: {state}")
check(vm.runtime.powerState == "poweredOff", f"powered off: {vm.runtime.powerState}")
Disconnect(si)
print("all pyvmomi checks passed")
