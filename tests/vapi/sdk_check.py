"""What a user of the vSphere Automation SDK for Python checks against the cloud endpoint.

Run by tests/tests/vapi.rs in the virtualenv of tests/vapi/venv.sh, with one argument: a
JSON file of what the REST API answered for the same domain (the test's expectations),
the server address, the CA and the credentials. Prints one line per check; any failure
raises, and the exit status is not 0.
"""

import json
import sys

import requests
from com.vmware.cis_client import Tasks
from com.vmware.appliance.system_client import Version
from com.vmware.vapi.std.errors_client import NotFound, ServiceUnavailable, Unauthenticated
from com.vmware.vcenter_client import (
    VM,
    Cluster,
    Datacenter,
    Datastore,
    Folder,
    Host,
    Network,
)
from com.vmware.vcenter.vm.guest_client import Identity
from com.vmware.vcenter.vm.hardware_client import Boot, Cpu, Disk, Ethernet, Memory
from com.vmware.vcenter.vm_client import Hardware, Power
from vmware.vapi.lib.connect import get_requests_connector
from vmware.vapi.security.client.security_context_filter import (
    LegacySecurityContextFilter,
)
from vmware.vapi.security.session import create_session_security_context
from vmware.vapi.stdlib.client.factories import StubConfigurationFactory
from vmware.vapi.vsphere.client import create_vsphere_client

with open(sys.argv[1]) as f:
    want = json.load(f)
SERVER = want["server"]


def http():
    """A requests session that trusts only the test CA."""
    s = requests.Session()
    s.verify = want["ca"]
    # requests lets REQUESTS_CA_BUNDLE (set on many CI machines) override the session's
    # verify, and HTTPS_PROXY send even 127.0.0.1 to a proxy: neither applies here.
    s.trust_env = False
    return s


def ok(what):
    print("ok:", what, flush=True)


def same(got, expected, what):
    assert got == expected, "%s: got %r, want %r" % (what, got, expected)
    ok(what)


def raises(exc, call, what):
    try:
        call()
    except exc as e:
        ok("%s raises %s (%s)" % (what, exc.__name__, e.messages[0].default_message))
        return
    except Exception as e:  # noqa: BLE001 - the wrong exception is the failure shown
        raise AssertionError("%s: raised %r, not %s" % (what, e, exc.__name__)) from e
    raise AssertionError("%s: no %s raised" % (what, exc.__name__))


def stub_config(session_id):
    """The stub configuration a client builds to call services the vsphere client does
    not expose (com.vmware.cis.tasks)."""
    return StubConfigurationFactory.new_std_configuration(
        get_requests_connector(
            session=http(),
            url="https://%s/api" % SERVER,
            provider_filter_chain=[
                LegacySecurityContextFilter(
                    security_context=create_session_security_context(session_id)
                )
            ],
        )
    )


def rest_session(token):
    return http().get(
        "https://%s/api/session" % SERVER,
        headers={"vmware-api-session-id": token},
    )


# --- login --------------------------------------------------------------------------
raises(
    Unauthenticated,
    lambda: create_vsphere_client(
        server=SERVER, username=want["user"], password="wrong", session=http()
    ),
    "login with a bad password",
)
client = create_vsphere_client(
    server=SERVER, username=want["user"], password=want["password"], session=http()
)
vc = client.vcenter
session_id = client.get_session_id()
same(client.session_svc.get().user, want["user"], "session get names the user")

# Sessions are shared: the vAPI session works in REST, the REST token in vAPI.
r = rest_session(session_id)
same((r.status_code, r.json()["user"]), (200, want["user"]), "vAPI session in REST")
rest_client = create_vsphere_client(
    server=SERVER, session_id=want["rest_token"], session=http()
)
same(
    sorted(v.vm for v in rest_client.vcenter.VM.list()),
    sorted(v["vm"] for v in want["lists"]["vm"]),
    "REST session in vAPI",
)

# --- lists: the same objects as REST --------------------------------------------------
services = {
    "vm": (vc.VM, "vm"),
    "host": (vc.Host, "host"),
    "datastore": (vc.Datastore, "datastore"),
    "network": (vc.Network, "network"),
    "datacenter": (vc.Datacenter, "datacenter"),
    "cluster": (vc.Cluster, "cluster"),
    "folder": (vc.Folder, "folder"),
}
for kind, (svc, id_field) in services.items():
    got = sorted((getattr(s, id_field), s.name) for s in svc.list())
    expected = sorted((o[id_field], o["name"]) for o in want["lists"][kind])
    assert expected, "the REST list of %s is empty: nothing to compare" % kind
    same(got, expected, "%s list matches REST (%d)" % (kind, len(got)))

vms = {v["name"]: v for v in want["lists"]["vm"]}
web, db = vms["web01"], vms["db01"]
summary = [s for s in vc.VM.list() if s.vm == web["vm"]][0]
same(
    (summary.power_state, summary.cpu_count, summary.memory_size_mib),
    (Power.State(web["power_state"]), web["cpu_count"], web["memory_size_MiB"]),
    "VM summary fields",
)

# --- filters narrow ---------------------------------------------------------------------
def vm_ids(**spec):
    return sorted(s.vm for s in vc.VM.list(VM.FilterSpec(**spec)))


same(vm_ids(names={"web01"}), [web["vm"]], "VM filter names=web01")
same(vm_ids(names={"web01", "db01"}), sorted([web["vm"], db["vm"]]), "VM filter two names")
same(vm_ids(names={"nothing-like-it"}), [], "VM filter on an unknown name")
same(
    vm_ids(power_states={Power.State.POWERED_OFF}),
    sorted([web["vm"], db["vm"]]),
    "VM filter power_states=POWERED_OFF",
)
same(vm_ids(power_states={Power.State.POWERED_ON}), [], "VM filter power_states=POWERED_ON")
same(vm_ids(vms={db["vm"]}), [db["vm"]], "VM filter vms=")
same(
    vm_ids(clusters={want["cluster"]}, names={"db01"}),
    [db["vm"]],
    "VM filter clusters= and names= together",
)

vm_folders = sorted(
    f.folder for f in vc.Folder.list(Folder.FilterSpec(type=Folder.Type.VIRTUAL_MACHINE))
)
same(vm_folders, sorted(want["vm_folders"]), "folder filter type=VIRTUAL_MACHINE")
assert len(vm_folders) < len(want["lists"]["folder"])
same(
    [h.host for h in vc.Host.list(Host.FilterSpec(clusters={want["cluster"]}))],
    [want["lists"]["host"][0]["host"]],
    "host filter clusters=",
)
same(vc.Host.list(Host.FilterSpec(names={"esx-nowhere"})), [], "host filter unknown name")
same(vc.Host.list(Host.FilterSpec(standalone=True)), [], "host filter standalone=True")
net = [n for n in want["lists"]["network"] if n["name"] == "cloud-web"][0]
same(
    [(n.network, n.type) for n in vc.Network.list(Network.FilterSpec(names={"cloud-web"}))],
    [(net["network"], Network.Type.STANDARD_PORTGROUP)],
    "network filter names=cloud-web",
)
same(
    len(vc.Datastore.list(Datastore.FilterSpec(types={Datastore.Type.VMFS}))),
    1,
    "datastore filter types=VMFS",
)
same(vc.Datastore.list(Datastore.FilterSpec(types={Datastore.Type.NFS})), [], "datastore filter types=NFS")
dc = want["lists"]["datacenter"][0]
same(
    [d.datacenter for d in vc.Datacenter.list(Datacenter.FilterSpec(names={dc["name"]}))],
    [dc["datacenter"]],
    "datacenter filter names=",
)
same(
    vc.Cluster.list(Cluster.FilterSpec(datacenters={"datacenter-999999"})),
    [],
    "cluster filter on another datacenter",
)

# --- gets ---------------------------------------------------------------------------
info = vc.VM.get(web["vm"])
rest = want["vm_get"]
same(info.name, "web01", "VM get name")
same(str(info.guest_os), rest["guest_OS"], "VM get guest_OS")
same(
    (info.cpu.count, info.cpu.cores_per_socket, info.memory.size_mib),
    (rest["cpu"]["count"], rest["cpu"]["cores_per_socket"], rest["memory"]["size_MiB"]),
    "VM get CPU and memory",
)
same(
    (info.identity.instance_uuid, info.identity.bios_uuid),
    (rest["identity"]["instance_uuid"], rest["identity"].get("bios_uuid", "")),
    "VM get identity",
)
same(str(info.boot.type), rest["boot"]["type"], "VM get boot type")
same(
    sorted((k, d.capacity, d.backing.vmdk_file) for k, d in info.disks.items()),
    sorted((k, d["capacity"], d["backing"]["vmdk_file"]) for k, d in rest["disks"].items()),
    "VM get disks",
)
same(
    sorted((k, n.mac_address, n.backing.network, n.backing.network_name) for k, n in info.nics.items()),
    sorted(
        (k, n.get("mac_address"), n["backing"]["network"], n["backing"]["network_name"])
        for k, n in rest["nics"].items()
    ),
    "VM get NICs",
)
same(sorted(info.scsi_adapters), sorted(rest["scsi_adapters"]), "VM get SCSI adapters")
same(info.cdroms, {}, "VM get has no CD-ROMs")

ds = want["lists"]["datastore"][0]
ds_info = vc.Datastore.get(ds["datastore"])
same(
    (ds_info.name, str(ds_info.type), ds_info.accessible),
    (ds["name"], "VMFS", True),
    "datastore get",
)
dc_info = vc.Datacenter.get(dc["datacenter"])
same(dc_info.vm_folder, want["datacenter_get"]["vm_folder"], "datacenter get vm_folder")
cl_info = vc.Cluster.get(want["cluster"])
same(
    (cl_info.name, cl_info.resource_pool),
    (want["cluster_get"]["name"], want["cluster_get"]["resource_pool"]),
    "cluster get",
)
same(
    vm_ids(resource_pools={cl_info.resource_pool}),
    sorted([web["vm"], db["vm"]]),
    "VM filter on the cluster's root resource pool",
)

# --- a VM's hardware, one resource at a time: what VM get showed ------------------------
config = stub_config(session_id)
vm = web["vm"]
hw = Hardware(config).get(vm)
same(
    (str(hw.version), str(hw.upgrade_policy), str(hw.upgrade_status)),
    (rest["hardware"]["version"], rest["hardware"]["upgrade_policy"], rest["hardware"]["upgrade_status"]),
    "hardware get",
)
cpu = Cpu(config).get(vm)
same((cpu.count, cpu.cores_per_socket), (rest["cpu"]["count"], rest["cpu"]["cores_per_socket"]), "hardware cpu get")
same(Memory(config).get(vm).size_mib, rest["memory"]["size_MiB"], "hardware memory get")
same(str(Boot(config).get(vm).type), rest["boot"]["type"], "hardware boot get")
disks = Disk(config)
same(sorted(d.disk for d in disks.list(vm)), sorted(rest["disks"]), "hardware disk list")
for key, want_disk in rest["disks"].items():
    d = disks.get(vm, key)
    same(
        (d.label, d.capacity, d.backing.vmdk_file, d.scsi.bus, d.scsi.unit),
        (
            want_disk["label"],
            want_disk["capacity"],
            want_disk["backing"]["vmdk_file"],
            want_disk["scsi"]["bus"],
            want_disk["scsi"]["unit"],
        ),
        "hardware disk get %s" % key,
    )
nics = Ethernet(config)
same(sorted(n.nic for n in nics.list(vm)), sorted(rest["nics"]), "hardware ethernet list")
for key, want_nic in rest["nics"].items():
    n = nics.get(vm, key)
    same(
        (n.mac_address, n.backing.network, str(n.type)),
        (want_nic["mac_address"], want_nic["backing"]["network"], want_nic["type"]),
        "hardware ethernet get %s" % key,
    )
raises(NotFound, lambda: disks.get(vm, "2999"), "disk get of a missing disk")
raises(NotFound, lambda: Cpu(config).get("vm-999999"), "cpu get of a missing VM")
raises(ServiceUnavailable, lambda: Identity(config).get(vm), "guest identity without VMware Tools")
version = Version(config).get()
assert version.version.startswith("8.0."), version.version
ok("appliance version %s (%s)" % (version.version, version.type))

# --- missing objects ------------------------------------------------------------------
raises(NotFound, lambda: vc.VM.get("vm-999999"), "VM get of a missing VM")
raises(NotFound, lambda: vc.Datastore.get("datastore-999999"), "datastore get of a missing one")
raises(NotFound, lambda: vc.Cluster.get("domain-c999999"), "cluster get of a missing one")

# --- the migration's task -------------------------------------------------------------
tasks = Tasks(stub_config(session_id))
task = tasks.get(want["task"])
same(str(task.status), "SUCCEEDED", "the migration's task SUCCEEDED")
same((task.target.type, task.target.id), ("VirtualMachine", web["vm"]), "task target is the VM")
same((task.service, task.operation), ("com.vmware.vcenter.VM", "relocate"), "task service and operation")
same(task.user, want["migrator"], "task user")
same(task.progress.completed, task.progress.total, "task progress complete")
assert task.progress.total > 0
assert task.start_time <= task.end_time, (task.start_time, task.end_time)
ok("task times: %s .. %s" % (task.start_time, task.end_time))
raises(NotFound, lambda: tasks.get("migration-999999"), "task get of a missing task")

# --- logout -----------------------------------------------------------------------------
client.session_svc.delete()
raises(Unauthenticated, lambda: vc.VM.list(), "VM list after logout")
raises(Unauthenticated, lambda: tasks.get(want["task"]), "task get after logout")
same(rest_session(session_id).status_code, 401, "the ended session in REST")
# The REST session is still alive: logging out ends one session only.
same(len(rest_client.vcenter.VM.list()), len(want["lists"]["vm"]), "the other session lives on")
print("all SDK checks passed", flush=True)
