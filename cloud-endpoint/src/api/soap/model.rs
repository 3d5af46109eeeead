//! The vim25 object model over the inventory: which managed objects exist, what kind each
//! is, and the properties scripts read, computed from one [`Snapshot`] of the inventory
//! per call. Ids are the inventory's (`vm-14`, `group-v7`, `datastore-10`), the same as
//! in REST.

use std::collections::{BTreeSet, HashMap};

use super::fault::Fault;
use super::schema;
use super::tasks::{self, TaskRecord};
use super::value::{MoRef, Value};
use crate::inventory::{DomainInfo, NetworkInfo, VmRecord};

pub const SERVICE_INSTANCE: &str = "ServiceInstance";
pub const PROPERTY_COLLECTOR: &str = "propertyCollector";
pub const VIEW_MANAGER: &str = "ViewManager";
pub const SESSION_MANAGER: &str = "SessionManager";
pub const SEARCH_INDEX: &str = "SearchIndex";
pub const TASK_MANAGER: &str = "TaskManager";

const ENTITY_KINDS: &[&str] = &[
    "Folder",
    "Datacenter",
    "ClusterComputeResource",
    "HostSystem",
    "ResourcePool",
    "Datastore",
    "Network",
    "VirtualMachine",
];

/// Whether an object of `kind` is a `wanted` (its own type or a base type of it).
pub fn is_a(kind: &str, wanted: &str) -> bool {
    kind == wanted
        || wanted == "ManagedObject"
        || (wanted == "ManagedEntity" && ENTITY_KINDS.contains(&kind))
        || (wanted == "ComputeResource" && kind == "ClusterComputeResource")
        || (matches!(wanted, "View" | "ManagedObjectView") && kind == "ContainerView")
        || (wanted == "ExtensibleManagedObject" && (ENTITY_KINDS.contains(&kind) || kind == "Task"))
}

/// Whether `kind` names a managed object type this endpoint knows (for PropertySpec.type).
pub fn known_type(kind: &str) -> bool {
    ENTITY_KINDS.contains(&kind)
        || matches!(
            kind,
            "ManagedObject"
                | "ManagedEntity"
                | "ExtensibleManagedObject"
                | "ComputeResource"
                | "View"
                | "ManagedObjectView"
                | "ContainerView"
                | "Task"
                | "SessionManager"
                | "ServiceInstance"
                | "PropertyCollector"
                | "ViewManager"
                | "SearchIndex"
                | "TaskManager"
        )
}

/// The properties `all=true` returns, and the first step of every path that is answered.
pub fn properties(kind: &str) -> &'static [&'static str] {
    match kind {
        "Folder" => &["name", "parent", "overallStatus", "childEntity", "childType"],
        "Datacenter" => &[
            "name",
            "parent",
            "overallStatus",
            "vmFolder",
            "hostFolder",
            "datastoreFolder",
            "networkFolder",
            "datastore",
            "network",
        ],
        "ClusterComputeResource" => &[
            "name",
            "parent",
            "overallStatus",
            "host",
            "resourcePool",
            "datastore",
            "network",
        ],
        "HostSystem" => &[
            "name",
            "parent",
            "overallStatus",
            "vm",
            "datastore",
            "network",
            "runtime",
            "summary",
            "hardware",
        ],
        "ResourcePool" => &["name", "parent", "overallStatus", "owner", "resourcePool", "vm"],
        "Datastore" => &["name", "parent", "overallStatus", "summary", "vm"],
        "Network" => &["name", "parent", "overallStatus", "summary", "vm"],
        "VirtualMachine" => &[
            "name",
            "parent",
            "overallStatus",
            "config",
            "runtime",
            "summary",
            "datastore",
            "network",
            "resourcePool",
        ],
        "ContainerView" => &["view", "container", "type", "recursive"],
        "Task" => &["info"],
        "TaskManager" => &["recentTask", "description", "maxCollector"],
        "SessionManager" => &["currentSession"],
        "ServiceInstance" => &["content", "serverClock"],
        _ => &[],
    }
}

/// Checks a property path against vim25's types, as vCenter does before it reads a
/// value: the first step must be a property of `kind` that this endpoint answers
/// ([`properties`]), every later step a field of the type the step before has in vim25
/// (`config.hardware.device`: VirtualMachineConfigInfo has `hardware`, VirtualHardware
/// has `device`). A step into an array, a string or a reference is no field either. A
/// path that passes may still be unset here, and is then left out, as an unset property
/// is.
pub fn check_path(kind: &str, path: &str) -> Result<(), Fault> {
    let mut steps = path.split('.');
    let first = steps.next().unwrap_or_default();
    if !properties(kind).contains(&first) {
        return Err(Fault::invalid_property(
            path,
            format!("{kind} has no property {first:?} that this endpoint answers"),
        ));
    }
    let mut at = schema::PROPERTY_TYPES
        .iter()
        .find(|(k, p, _)| *k == kind && *p == first)
        .map(|(_, _, t)| *t);
    let mut walked = first.to_owned();
    for step in steps {
        let fields = at.and_then(|t| schema::DATA_TYPES.iter().find(|(name, _)| *name == t));
        let Some((ty, fields)) = fields else {
            return Err(Fault::invalid_property(
                path,
                format!("{kind}.{walked} is no data object: a path cannot step into it to {step:?}"),
            ));
        };
        let Some((_, next)) = fields.iter().find(|(name, _)| *name == step) else {
            return Err(Fault::invalid_property(
                path,
                format!("{kind}.{walked} is a {ty}, which has no field {step:?}"),
            ));
        };
        at = (!next.is_empty()).then_some(*next);
        walked.push('.');
        walked.push_str(step);
    }
    Ok(())
}

/// A container view of one session (`ViewManager.CreateContainerView`).
#[derive(Debug, Clone)]
pub struct View {
    pub container: MoRef,
    pub types: Vec<String>,
    pub recursive: bool,
}

/// What a call's session adds to the inventory: its views, the tasks, its own session.
#[derive(Debug, Clone, Default)]
pub struct Extra {
    pub views: HashMap<String, View>,
    pub tasks: Vec<TaskRecord>,
    /// `SessionManager.currentSession` (a `UserSession`).
    pub session: Option<Value>,
    /// `about.instanceUuid`.
    pub instance_uuid: String,
}

/// `ServiceInstance.content`: where a client finds everything else.
pub fn service_content(root_folder: &str, instance_uuid: &str) -> Value {
    let r = |kind: &str, id: &str| Value::Ref(MoRef::new(kind, id));
    let s = Value::str;
    let about = Value::Data(
        "AboutInfo",
        vec![
            ("name", s("VMware vCenter Server")),
            (
                "fullName",
                s("VMware vCenter Server 8.0.3 build-24022515 (cloud migration gateway)"),
            ),
            ("vendor", s("VMware, Inc.")),
            ("version", s("8.0.3")),
            ("build", s("24022515")),
            ("localeVersion", s("INTL")),
            ("localeBuild", s("000")),
            ("osType", s("linux-x64")),
            ("productLineId", s("vpx")),
            ("apiType", s("VirtualCenter")),
            ("apiVersion", s(super::API_VERSION)),
            ("instanceUuid", s(instance_uuid)),
            ("licenseProductName", s("VMware VirtualCenter Server")),
            ("licenseProductVersion", s("8.0")),
        ],
    );
    Value::Data(
        "ServiceContent",
        vec![
            ("rootFolder", r("Folder", root_folder)),
            ("propertyCollector", r("PropertyCollector", PROPERTY_COLLECTOR)),
            ("viewManager", r("ViewManager", VIEW_MANAGER)),
            ("about", about),
            ("sessionManager", r("SessionManager", SESSION_MANAGER)),
            ("taskManager", r("TaskManager", TASK_MANAGER)),
            ("searchIndex", r("SearchIndex", SEARCH_INDEX)),
        ],
    )
}

#[derive(Debug, Clone, Copy)]
enum Obj {
    RootFolder(usize),
    Folder(usize),
    Datacenter,
    Cluster(usize),
    Host(usize),
    Pool(usize),
    Datastore(usize),
    Network(usize),
    Vm(usize),
    View,
    Task(usize),
    Singleton(&'static str),
}

/// The inventory at one instant, with the indexes the property collector walks.
#[derive(Debug)]
pub struct Snapshot {
    d: DomainInfo,
    vms: Vec<VmRecord>,
    networks: Vec<NetworkInfo>,
    /// Datastore id to (free bytes, capacity).
    space: HashMap<String, (u64, u64)>,
    extra: Extra,
    index: HashMap<String, Obj>,
}

impl Snapshot {
    pub fn new(
        d: DomainInfo,
        vms: Vec<VmRecord>,
        networks: Vec<NetworkInfo>,
        space: HashMap<String, (u64, u64)>,
        extra: Extra,
    ) -> Snapshot {
        let mut index = HashMap::new();
        for (i, f) in d.folders.iter().enumerate() {
            let obj = if f.parent.is_none() {
                Obj::RootFolder(i)
            } else {
                Obj::Folder(i)
            };
            index.insert(f.id.clone(), obj);
        }
        index.insert(d.datacenter.id.clone(), Obj::Datacenter);
        for (i, c) in d.clusters.iter().enumerate() {
            index.insert(c.id.clone(), Obj::Cluster(i));
        }
        for (i, h) in d.hosts.iter().enumerate() {
            index.insert(h.id.clone(), Obj::Host(i));
        }
        for (i, p) in d.resource_pools.iter().enumerate() {
            index.insert(p.id.clone(), Obj::Pool(i));
        }
        for (i, ds) in d.datastores.iter().enumerate() {
            index.insert(ds.id.clone(), Obj::Datastore(i));
        }
        for (i, n) in networks.iter().enumerate() {
            index.insert(n.id.clone(), Obj::Network(i));
        }
        for (i, vm) in vms.iter().enumerate() {
            index.insert(vm.id.clone(), Obj::Vm(i));
        }
        for id in extra.views.keys() {
            index.insert(id.clone(), Obj::View);
        }
        for (i, t) in extra.tasks.iter().enumerate() {
            index.insert(t.id.clone(), Obj::Task(i));
        }
        for (id, kind) in [
            (SERVICE_INSTANCE, "ServiceInstance"),
            (PROPERTY_COLLECTOR, "PropertyCollector"),
            (VIEW_MANAGER, "ViewManager"),
            (SESSION_MANAGER, "SessionManager"),
            (SEARCH_INDEX, "SearchIndex"),
            (TASK_MANAGER, "TaskManager"),
        ] {
            index.insert(id.to_owned(), Obj::Singleton(kind));
        }
        Snapshot {
            d,
            vms,
            networks,
            space,
            extra,
            index,
        }
    }

    pub fn root_folder(&self) -> MoRef {
        let id = self
            .d
            .folders
            .iter()
            .find(|f| f.parent.is_none())
            .map_or("group-d1", |f| f.id.as_str());
        MoRef::new("Folder", id)
    }

    pub fn datacenter(&self) -> MoRef {
        MoRef::new("Datacenter", &self.d.datacenter.id)
    }

    /// The kind of object `id`, if it exists.
    pub fn kind_of(&self, id: &str) -> Option<&'static str> {
        Some(match self.index.get(id)? {
            Obj::RootFolder(_) | Obj::Folder(_) => "Folder",
            Obj::Datacenter => "Datacenter",
            Obj::Cluster(_) => "ClusterComputeResource",
            Obj::Host(_) => "HostSystem",
            Obj::Pool(_) => "ResourcePool",
            Obj::Datastore(_) => "Datastore",
            Obj::Network(_) => "Network",
            Obj::Vm(_) => "VirtualMachine",
            Obj::View => "ContainerView",
            Obj::Task(_) => "Task",
            Obj::Singleton(kind) => kind,
        })
    }

    /// The reference to `id` with its real kind, or ManagedObjectNotFound for `asked`.
    pub fn resolve(&self, asked: &MoRef) -> Result<MoRef, Fault> {
        match self.kind_of(&asked.value) {
            Some(kind) if asked.kind.is_empty() || is_a(kind, &asked.kind) => Ok(MoRef::new(kind, &asked.value)),
            _ => Err(Fault::not_found(asked)),
        }
    }

    fn r(&self, id: &str) -> MoRef {
        MoRef::new(self.kind_of(id).unwrap_or("ManagedEntity"), id)
    }

    /// The value at `path` of object `obj` (which exists): `None` when unset; a path
    /// vim25's types do not have is InvalidProperty ([`check_path`]).
    pub fn get(&self, obj: &MoRef, path: &str) -> Result<Option<Value>, Fault> {
        check_path(&obj.kind, path)?;
        let mut steps = path.split('.');
        let first = steps.next().unwrap_or_default();
        let Some(mut value) = self.top(obj, first) else {
            return Ok(None);
        };
        for step in steps {
            match value.field(step) {
                Some(v) => value = v.clone(),
                None => return Ok(None),
            }
        }
        Ok(Some(value))
    }

    fn top(&self, obj: &MoRef, prop: &str) -> Option<Value> {
        let entry = *self.index.get(&obj.value)?;
        match prop {
            "name" => return self.name(entry).map(|n| Value::Str(n.to_owned())),
            "parent" => return self.parent(entry).map(|p| Value::Ref(self.r(&p))),
            "overallStatus" => return Some(Value::Enum("ManagedEntityStatus", "green".into())),
            _ => {}
        }
        let all_ds = || Value::refs(self.d.datastores.iter().map(|d| MoRef::new("Datastore", &d.id)));
        let all_nets = || Value::refs(self.networks.iter().map(|n| MoRef::new("Network", &n.id)));
        match (entry, prop) {
            (Obj::RootFolder(_) | Obj::Folder(_), "childEntity") => Some(Value::refs(self.folder_children(entry))),
            (Obj::RootFolder(i) | Obj::Folder(i), "childType") => {
                let types: &[&str] = match self.d.folders[i].kind.as_str() {
                    "DATACENTER" => &["Folder", "Datacenter"],
                    "VIRTUAL_MACHINE" => &["Folder", "VirtualMachine", "VirtualApp"],
                    "HOST" => &["Folder", "ComputeResource"],
                    "DATASTORE" => &["Folder", "Datastore", "StoragePod"],
                    _ => &["Folder", "Network", "DistributedVirtualSwitch"],
                };
                Some(Value::strings(types.iter().copied()))
            }
            (Obj::Datacenter, "vmFolder") => Some(Value::Ref(MoRef::new("Folder", &self.d.datacenter.vm_folder))),
            (Obj::Datacenter, "hostFolder") => Some(Value::Ref(MoRef::new("Folder", &self.d.datacenter.host_folder))),
            (Obj::Datacenter, "datastoreFolder") => {
                Some(Value::Ref(MoRef::new("Folder", &self.d.datacenter.datastore_folder)))
            }
            (Obj::Datacenter, "networkFolder") => {
                Some(Value::Ref(MoRef::new("Folder", &self.d.datacenter.network_folder)))
            }
            (Obj::Datacenter | Obj::Cluster(_) | Obj::Host(_), "datastore") => Some(all_ds()),
            (Obj::Datacenter | Obj::Cluster(_) | Obj::Host(_), "network") => Some(all_nets()),
            (Obj::Cluster(i), "host") => {
                let c = &self.d.clusters[i].id;
                Some(Value::refs(
                    self.d
                        .hosts
                        .iter()
                        .filter(|h| &h.cluster == c)
                        .map(|h| MoRef::new("HostSystem", &h.id)),
                ))
            }
            (Obj::Cluster(i), "resourcePool") => Some(Value::Ref(MoRef::new(
                "ResourcePool",
                &crate::inventory::root_resource_pool(&self.d.clusters[i].id),
            ))),
            (Obj::Host(i), "vm") => {
                let h = &self.d.hosts[i].id;
                Some(self.vm_refs(|vm| &vm.host == h))
            }
            (Obj::Host(i), _) => super::host::property(&self.d.hosts[i], prop),
            (Obj::Pool(i), "owner") => Some(Value::Ref(MoRef::new(
                "ClusterComputeResource",
                &self.d.resource_pools[i].cluster,
            ))),
            (Obj::Pool(i), "resourcePool") => {
                let p = &self.d.resource_pools[i].id;
                Some(Value::refs(
                    self.d
                        .resource_pools
                        .iter()
                        .filter(|c| c.parent.as_ref() == Some(p))
                        .map(|c| MoRef::new("ResourcePool", &c.id)),
                ))
            }
            (Obj::Pool(i), "vm") => {
                let p = &self.d.resource_pools[i].id;
                Some(self.vm_refs(|vm| &vm.resource_pool == p))
            }
            (Obj::Datastore(i), "vm") => {
                let ds = &self.d.datastores[i].id;
                Some(self.vm_refs(|vm| &vm.datastore == ds || vm.disks.iter().any(|d| &d.datastore == ds)))
            }
            (Obj::Datastore(i), "summary") => Some(self.datastore_summary(i)),
            (Obj::Network(i), "vm") => {
                let n = &self.networks[i].id;
                Some(self.vm_refs(|vm| vm.nics.iter().any(|nic| &nic.network == n)))
            }
            (Obj::Network(i), "summary") => {
                let n = &self.networks[i];
                Some(Value::Data(
                    "NetworkSummary",
                    vec![
                        ("network", Value::Ref(MoRef::new("Network", &n.id))),
                        ("name", Value::str(&n.name)),
                        ("accessible", Value::Bool(true)),
                    ],
                ))
            }
            (Obj::Vm(i), _) => super::vm::property(&self.vms[i], prop),
            (Obj::View, "view") => Some(Value::refs(self.view_contents(&obj.value))),
            (Obj::View, "container") => self
                .extra
                .views
                .get(&obj.value)
                .map(|v| Value::Ref(v.container.clone())),
            (Obj::View, "type") => self
                .extra
                .views
                .get(&obj.value)
                .map(|v| Value::strings(v.types.iter().map(String::as_str))),
            (Obj::View, "recursive") => self.extra.views.get(&obj.value).map(|v| Value::Bool(v.recursive)),
            (Obj::Task(i), "info") => Some(self.extra.tasks[i].info()),
            (Obj::Singleton(TASK_MANAGER), "recentTask") => Some(Value::refs(tasks::recent(&self.extra.tasks))),
            (Obj::Singleton(TASK_MANAGER), "description") => Some(tasks::description()),
            // No TaskHistoryCollector can be created here (CreateCollectorForTasks is
            // NotSupported).
            (Obj::Singleton(TASK_MANAGER), "maxCollector") => Some(Value::Int(0)),
            (Obj::Singleton(_), "currentSession") => self.extra.session.clone(),
            (Obj::Singleton(_), "content") => {
                Some(service_content(&self.root_folder().value, &self.extra.instance_uuid))
            }
            (Obj::Singleton(_), "serverClock") => Some(Value::Time(crate::api::session::rfc3339_millis(
                time::OffsetDateTime::now_utc(),
            ))),
            _ => None,
        }
    }

    fn vm_refs(&self, keep: impl Fn(&VmRecord) -> bool) -> Value {
        Value::refs(
            self.vms
                .iter()
                .filter(|vm| keep(vm))
                .map(|vm| MoRef::new("VirtualMachine", &vm.id)),
        )
    }

    fn datastore_summary(&self, i: usize) -> Value {
        let ds = &self.d.datastores[i];
        let (free, capacity) = self.space.get(&ds.id).copied().unwrap_or((0, 0));
        Value::Data(
            "DatastoreSummary",
            vec![
                ("datastore", Value::Ref(MoRef::new("Datastore", &ds.id))),
                ("name", Value::str(&ds.name)),
                ("url", Value::Str(format!("ds:///vmfs/volumes/{}/", ds.id))),
                ("capacity", Value::Long(capacity as i64)),
                ("freeSpace", Value::Long(free as i64)),
                ("accessible", Value::Bool(capacity > 0)),
                ("multipleHostAccess", Value::Bool(false)),
                ("type", Value::str("VMFS")),
            ],
        )
    }

    fn name(&self, entry: Obj) -> Option<&str> {
        Some(match entry {
            Obj::RootFolder(i) | Obj::Folder(i) => &self.d.folders[i].name,
            Obj::Datacenter => &self.d.datacenter.name,
            Obj::Cluster(i) => &self.d.clusters[i].name,
            Obj::Host(i) => &self.d.hosts[i].name,
            Obj::Pool(i) => &self.d.resource_pools[i].name,
            Obj::Datastore(i) => &self.d.datastores[i].name,
            Obj::Network(i) => &self.networks[i].name,
            Obj::Vm(i) => &self.vms[i].name,
            _ => return None,
        })
    }

    fn parent(&self, entry: Obj) -> Option<String> {
        let dc = &self.d.datacenter;
        Some(match entry {
            Obj::RootFolder(_) => return None,
            Obj::Folder(i) => self.d.folders[i].parent.clone()?,
            Obj::Datacenter => self.root_folder().value,
            Obj::Cluster(_) => dc.host_folder.clone(),
            Obj::Host(i) => self.d.hosts[i].cluster.clone(),
            Obj::Pool(i) => {
                let p = &self.d.resource_pools[i];
                p.parent.clone().unwrap_or_else(|| p.cluster.clone())
            }
            Obj::Datastore(_) => dc.datastore_folder.clone(),
            Obj::Network(_) => dc.network_folder.clone(),
            Obj::Vm(i) => self.vms[i].folder.clone(),
            _ => return None,
        })
    }

    fn folder_children(&self, entry: Obj) -> Vec<MoRef> {
        let (Obj::RootFolder(i) | Obj::Folder(i)) = entry else {
            return Vec::new();
        };
        let folder = &self.d.folders[i];
        let dc = &self.d.datacenter;
        let mut out: Vec<MoRef> = self
            .d
            .folders
            .iter()
            .filter(|f| f.parent.as_deref() == Some(folder.id.as_str()))
            .map(|f| MoRef::new("Folder", &f.id))
            .collect();
        if folder.parent.is_none() {
            out.push(self.datacenter());
        }
        if folder.id == dc.host_folder {
            out.extend(
                self.d
                    .clusters
                    .iter()
                    .map(|c| MoRef::new("ClusterComputeResource", &c.id)),
            );
        }
        if folder.id == dc.datastore_folder {
            out.extend(self.d.datastores.iter().map(|d| MoRef::new("Datastore", &d.id)));
        }
        if folder.id == dc.network_folder {
            out.extend(self.networks.iter().map(|n| MoRef::new("Network", &n.id)));
        }
        out.extend(
            self.vms
                .iter()
                .filter(|vm| vm.folder == folder.id)
                .map(|vm| MoRef::new("VirtualMachine", &vm.id)),
        );
        out
    }

    /// The objects a container view sees inside: a folder's entities, a datacenter's four
    /// folders, a cluster's hosts and root pool, a pool's child pools and VMs.
    fn children(&self, obj: &MoRef) -> Vec<MoRef> {
        let Some(entry) = self.index.get(&obj.value).copied() else {
            return Vec::new();
        };
        let refs = |prop: &str| self.top(obj, prop).map(|v| v.morefs()).unwrap_or_default();
        match entry {
            Obj::RootFolder(_) | Obj::Folder(_) => self.folder_children(entry),
            Obj::Datacenter => ["vmFolder", "hostFolder", "datastoreFolder", "networkFolder"]
                .iter()
                .flat_map(|p| refs(p))
                .collect(),
            Obj::Cluster(_) => [refs("host"), refs("resourcePool")].concat(),
            Obj::Pool(_) => [refs("resourcePool"), refs("vm")].concat(),
            _ => Vec::new(),
        }
    }

    /// What container view `id` holds now: the container's descendants (or children) of
    /// the view's types, each once, in tree order.
    pub fn view_contents(&self, id: &str) -> Vec<MoRef> {
        let Some(view) = self.extra.views.get(id) else {
            return Vec::new();
        };
        let mut seen = BTreeSet::new();
        let mut out = Vec::new();
        let mut stack: Vec<MoRef> = self.children(&view.container).into_iter().rev().collect();
        while let Some(obj) = stack.pop() {
            if !seen.insert(obj.clone()) {
                continue;
            }
            if view.types.is_empty() || view.types.iter().any(|t| is_a(&obj.kind, t)) {
                out.push(obj.clone());
            }
            if view.recursive {
                stack.extend(self.children(&obj).into_iter().rev());
            }
        }
        out
    }

    /// `SearchIndex.FindByInventoryPath`: `Datacenter/vm/folder/name`, from the root folder.
    pub fn find_by_inventory_path(&self, path: &str) -> Option<MoRef> {
        let mut at = self.root_folder();
        for step in path.split('/').filter(|s| !s.is_empty()) {
            at = self.find_child(&at, step)?;
        }
        Some(at)
    }

    /// `SearchIndex.FindChild`: the child of `parent` named `name` (a datacenter's
    /// children are its four folders).
    pub fn find_child(&self, parent: &MoRef, name: &str) -> Option<MoRef> {
        let children = match self.index.get(&parent.value)? {
            Obj::Datacenter | Obj::RootFolder(_) | Obj::Folder(_) | Obj::Cluster(_) | Obj::Pool(_) => {
                self.children(parent)
            }
            _ => return None,
        };
        children
            .into_iter()
            .find(|c| self.index.get(&c.value).and_then(|e| self.name(*e)) == Some(name))
    }

    /// `SearchIndex.FindAllByUuid` (and `FindByUuid`, its first): with `vm_search`, the
    /// VMs whose BIOS uuid (or instance uuid, when `instance` is set) is `uuid`; without,
    /// the hosts whose hardware uuid it is. Uuids compare without regard to case, as
    /// vCenter's do.
    pub fn find_all_by_uuid(&self, uuid: &str, vm_search: bool, instance: bool) -> Vec<MoRef> {
        if vm_search {
            self.vms
                .iter()
                .filter(|vm| {
                    if instance {
                        vm.instance_uuid.eq_ignore_ascii_case(uuid)
                    } else {
                        super::vm::bios_uuid(vm).eq_ignore_ascii_case(uuid)
                    }
                })
                .map(|vm| MoRef::new("VirtualMachine", &vm.id))
                .collect()
        } else {
            self.d
                .hosts
                .iter()
                .filter(|h| super::host::uuid(h).eq_ignore_ascii_case(uuid))
                .map(|h| MoRef::new("HostSystem", &h.id))
                .collect()
        }
    }
}
