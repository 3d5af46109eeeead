//! A VM's distributed-firewall rules as they travel in the plan, modelled on NSX DFW, and
//! the migration report the cloud gives back (what was created, how each NIC was mapped,
//! which rules were carried and which were not).
//!
//! The edge parses the rules file (shape only); the cloud checks their meaning
//! ([`FirewallSpec::problems`], plus the VM references it alone can resolve), because it
//! cannot trust an edge to have done so. What NSX has and the cloud domain does not
//! (Service Composer, SpoofGuard, security tags, NetX, Edge firewall) travels as
//! [`NotCarried`] items, so the report can list each one instead of dropping it.
//!
//! The serde shapes serve two encodings: postcard on the wire (variant indices, every
//! field present) and JSON in the rules file, the API and the stored report. Nothing here
//! may skip a field when serializing: postcard has no field names to notice a gap.

use std::net::IpAddr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::wire::WireError;

/// Rules per VM. NSX allows more per section; a VM's own rules are far fewer.
pub const MAX_FIREWALL_RULES: usize = 512;
/// Groups, and IP sets, per VM (each).
pub const MAX_FIREWALL_GROUPS: usize = 256;
/// Entries of one list (sources, destinations, services, applied-to, members, addresses).
pub const MAX_FIREWALL_LIST: usize = 256;
/// Entries of all lists together: bounds the plan's size (each entry up to
/// [`MAX_FIREWALL_TEXT`] bytes), so rules cannot push it past a control frame.
pub const MAX_FIREWALL_ENTRIES: usize = 4096;
/// Items that were not carried.
pub const MAX_NOT_CARRIED: usize = 256;
/// Longest name, id or address: NSX's display names are at most 255 characters.
pub const MAX_FIREWALL_TEXT: usize = 255;

/// The firewall part of a plan. `Default` is "no rules file".
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FirewallSpec {
    /// Where the rules came from (the file's name), so problems can name it.
    #[serde(default)]
    pub origin: String,
    /// The VM's name at the source, as the rules refer to it (the plan may rename the VM):
    /// references to it are rewritten to the VM's cloud id (`vm-N`).
    #[serde(default)]
    pub source_vm: String,
    #[serde(default)]
    pub rules: Vec<FirewallRule>,
    #[serde(default)]
    pub groups: Vec<FirewallGroup>,
    #[serde(default)]
    pub ip_sets: Vec<IpSet>,
    /// What the source had that the cloud domain cannot enforce.
    #[serde(default)]
    pub not_carried: Vec<NotCarried>,
}

/// One distributed-firewall rule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FirewallRule {
    /// NSX's rule id; unique among the VM's rules.
    pub id: String,
    pub name: String,
    pub action: RuleAction,
    #[serde(default)]
    pub direction: RuleDirection,
    /// Empty: any.
    #[serde(default)]
    pub sources: Vec<RuleEndpoint>,
    /// Empty: any.
    #[serde(default)]
    pub destinations: Vec<RuleEndpoint>,
    /// Empty: any protocol and port.
    #[serde(default)]
    pub services: Vec<RuleService>,
    /// Where the rule is enforced; empty: on this VM's NICs.
    #[serde(default)]
    pub applied_to: Vec<RuleEndpoint>,
    #[serde(default)]
    pub disabled: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum RuleAction {
    Allow,
    Drop,
    Reject,
}

impl RuleAction {
    pub fn as_str(self) -> &'static str {
        match self {
            RuleAction::Allow => "ALLOW",
            RuleAction::Drop => "DROP",
            RuleAction::Reject => "REJECT",
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum RuleDirection {
    In,
    Out,
    /// NSX's default.
    #[default]
    InOut,
}

impl RuleDirection {
    pub fn as_str(self) -> &'static str {
        match self {
            RuleDirection::In => "IN",
            RuleDirection::Out => "OUT",
            RuleDirection::InOut => "IN_OUT",
        }
    }
}

/// A source, destination, applied-to target or group member. In JSON one key:
/// `{"address": "10.0.0.0/24"}`, `{"vm": "web01"}`, `{"vm_id": "vm-14"}`,
/// `{"group": "web-tier"}`, `{"ip_set": "admins"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RuleEndpoint {
    /// An IP address, a CIDR block or a range `a-b`, IPv4 or IPv6.
    Address(String),
    /// A VM by its name: this VM's source name, or a VM already in the cloud domain.
    Vm(String),
    /// A VM of the cloud domain by id: what `Vm` references become once resolved.
    VmId(String),
    /// A group defined with the rules.
    Group(String),
    /// An IP set defined with the rules.
    IpSet(String),
}

impl RuleEndpoint {
    pub fn text(&self) -> &str {
        match self {
            RuleEndpoint::Address(s)
            | RuleEndpoint::Vm(s)
            | RuleEndpoint::VmId(s)
            | RuleEndpoint::Group(s)
            | RuleEndpoint::IpSet(s) => s,
        }
    }

    fn describe(&self) -> String {
        match self {
            RuleEndpoint::Address(s) => format!("address {s:?}"),
            RuleEndpoint::Vm(s) => format!("VM {s:?}"),
            RuleEndpoint::VmId(s) => format!("VM id {s:?}"),
            RuleEndpoint::Group(s) => format!("group {s:?}"),
            RuleEndpoint::IpSet(s) => format!("IP set {s:?}"),
        }
    }
}

/// A protocol and its ports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleService {
    pub protocol: Protocol,
    /// TCP and UDP only; empty: every port.
    #[serde(default)]
    pub ports: Vec<PortRange>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Protocol {
    Tcp,
    Udp,
    Icmp,
    Any,
}

/// Ports `from..=to`. JSON writes it `"443"`, `"8000-8080"` or `443`; postcard as two
/// numbers (serde's `is_human_readable` tells the encodings apart).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortRange {
    pub from: u16,
    pub to: u16,
}

impl std::fmt::Display for PortRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.from == self.to {
            write!(f, "{}", self.from)
        } else {
            write!(f, "{}-{}", self.from, self.to)
        }
    }
}

impl std::str::FromStr for PortRange {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("port {s:?} is not a port (1-65535) or a range like 8000-8080");
        let (a, b) = s.split_once('-').unwrap_or((s, s));
        let from: u16 = a.trim().parse().map_err(|_| bad())?;
        let to: u16 = b.trim().parse().map_err(|_| bad())?;
        Ok(PortRange { from, to })
    }
}

impl Serialize for PortRange {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            s.collect_str(self)
        } else {
            (self.from, self.to).serialize(s)
        }
    }
}

impl<'de> Deserialize<'de> for PortRange {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        if !d.is_human_readable() {
            let (from, to) = <(u16, u16)>::deserialize(d)?;
            return Ok(PortRange { from, to });
        }
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Text {
            Number(u16),
            Text(String),
        }
        match Text::deserialize(d)? {
            Text::Number(p) => Ok(PortRange { from: p, to: p }),
            Text::Text(s) => s.parse().map_err(serde::de::Error::custom),
        }
    }
}

/// A named set of members (NSX security group with static members).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FirewallGroup {
    pub name: String,
    #[serde(default)]
    pub members: Vec<RuleEndpoint>,
}

/// A named list of addresses (NSX IP set).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IpSet {
    pub name: String,
    #[serde(default)]
    pub addresses: Vec<String>,
}

/// NSX features that have no equivalent in the cloud domain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum NotCarriedKind {
    ServiceComposerPolicy,
    SpoofGuard,
    SecurityTag,
    NetX,
    EdgeFirewall,
}

impl NotCarriedKind {
    /// Why it is not carried, and what to do instead.
    pub fn reason(self) -> &'static str {
        match self {
            NotCarriedKind::ServiceComposerPolicy => {
                "Service Composer policies have no equivalent in the cloud domain; recreate what they enforce as firewall rules"
            }
            NotCarriedKind::SpoofGuard => {
                "the cloud domain has no SpoofGuard (IP/MAC binding enforcement); configure address binding in the cloud's network"
            }
            NotCarriedKind::SecurityTag => {
                "the cloud domain has no security tags; add the tagged VMs to groups by name instead"
            }
            NotCarriedKind::NetX => {
                "NetX service insertion (traffic redirected to a partner service VM) has no equivalent in the cloud domain"
            }
            NotCarriedKind::EdgeFirewall => {
                "Edge gateway firewall rules belong to the on-prem NSX Edge, not to the VM; recreate them on the cloud's gateway"
            }
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            NotCarriedKind::ServiceComposerPolicy => "Service Composer policy",
            NotCarriedKind::SpoofGuard => "SpoofGuard",
            NotCarriedKind::SecurityTag => "security tag",
            NotCarriedKind::NetX => "NetX service insertion",
            NotCarriedKind::EdgeFirewall => "Edge firewall integration",
        }
    }
}

/// Something of the source's firewall configuration that was not carried, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NotCarried {
    pub kind: NotCarriedKind,
    /// Its name at the source (a policy, a tag, a rule...), with where it was if useful.
    pub name: String,
    /// Empty in a request: filled from the kind ([`NotCarriedKind::reason`]).
    #[serde(default)]
    pub reason: String,
}

impl NotCarried {
    pub fn new(kind: NotCarriedKind, name: impl Into<String>) -> Self {
        NotCarried {
            kind,
            name: name.into(),
            reason: kind.reason().to_owned(),
        }
    }
}

/// An IPv4 or IPv6 address, CIDR block (`10.0.0.0/24`) or range (`10.0.0.1-10.0.0.9`).
pub fn is_address(s: &str) -> bool {
    if let Some((net, prefix)) = s.split_once('/') {
        let Ok(ip) = net.parse::<IpAddr>() else {
            return false;
        };
        let max = if ip.is_ipv4() { 32 } else { 128 };
        return prefix.parse::<u8>().is_ok_and(|p| p <= max) && !prefix.starts_with('+');
    }
    if let Some((a, b)) = s.split_once('-') {
        return match (a.parse::<IpAddr>(), b.parse::<IpAddr>()) {
            (Ok(a), Ok(b)) => a.is_ipv4() == b.is_ipv4() && a <= b,
            _ => false,
        };
    }
    s.parse::<IpAddr>().is_ok()
}

impl FirewallSpec {
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty() && self.groups.is_empty() && self.ip_sets.is_empty() && self.not_carried.is_empty()
    }

    /// Every endpoint of every rule and group, with where it is.
    fn endpoints(&self) -> impl Iterator<Item = &RuleEndpoint> {
        self.rules
            .iter()
            .flat_map(|r| r.sources.iter().chain(&r.destinations).chain(&r.applied_to))
            .chain(self.groups.iter().flat_map(|g| &g.members))
    }

    /// The VM names the rules and groups refer to.
    pub fn vm_references(&self) -> impl Iterator<Item = &str> {
        self.endpoints().filter_map(|e| match e {
            RuleEndpoint::Vm(name) => Some(name.as_str()),
            _ => None,
        })
    }

    /// The cloud VM ids the rules and groups refer to.
    pub fn vm_id_references(&self) -> impl Iterator<Item = &str> {
        self.endpoints().filter_map(|e| match e {
            RuleEndpoint::VmId(id) => Some(id.as_str()),
            _ => None,
        })
    }

    /// Rewrites every `Vm` reference `resolve` knows to a `VmId`.
    pub fn resolve_vms(&mut self, mut resolve: impl FnMut(&str) -> Option<String>) {
        let lists = self
            .rules
            .iter_mut()
            .flat_map(|r| [&mut r.sources, &mut r.destinations, &mut r.applied_to])
            .chain(self.groups.iter_mut().map(|g| &mut g.members));
        for list in lists {
            for e in list.iter_mut() {
                if let RuleEndpoint::Vm(name) = e {
                    if let Some(id) = resolve(name) {
                        *e = RuleEndpoint::VmId(id);
                    }
                }
            }
        }
    }

    /// Bounds what a peer may declare (see [`crate::plan::MigrationPlan::check_limits`]).
    pub fn check_limits(&self) -> Result<(), WireError> {
        let bad = |what: String| Err(WireError::BadPlan(what));
        let counts = [
            ("rules", self.rules.len(), MAX_FIREWALL_RULES),
            ("groups", self.groups.len(), MAX_FIREWALL_GROUPS),
            ("IP sets", self.ip_sets.len(), MAX_FIREWALL_GROUPS),
            ("items not carried", self.not_carried.len(), MAX_NOT_CARRIED),
        ];
        for (what, n, max) in counts {
            if n > max {
                return bad(format!("{n} firewall {what} is more than the {max} a VM may have"));
            }
        }
        let lists = self
            .rules
            .iter()
            .flat_map(|r| {
                [
                    r.sources.len(),
                    r.destinations.len(),
                    r.services.len(),
                    r.applied_to.len(),
                    r.services.iter().map(|s| s.ports.len()).max().unwrap_or(0),
                ]
            })
            .chain(self.groups.iter().map(|g| g.members.len()))
            .chain(self.ip_sets.iter().map(|s| s.addresses.len()));
        let mut entries = 0usize;
        for n in lists {
            if n > MAX_FIREWALL_LIST {
                return bad(format!(
                    "a firewall list of {n} entries is more than the {MAX_FIREWALL_LIST} allowed"
                ));
            }
            entries += n;
        }
        if entries > MAX_FIREWALL_ENTRIES {
            return bad(format!(
                "the firewall rules have {entries} entries in all, more than the {MAX_FIREWALL_ENTRIES} allowed"
            ));
        }
        let texts = [&self.origin, &self.source_vm]
            .into_iter()
            .chain(self.rules.iter().flat_map(|r| [&r.id, &r.name]))
            .chain(self.groups.iter().map(|g| &g.name))
            .chain(self.ip_sets.iter().map(|s| &s.name))
            .chain(self.ip_sets.iter().flat_map(|s| &s.addresses))
            .chain(self.not_carried.iter().map(|n| &n.name));
        for t in texts.chain(self.endpoints().map(|e| match e {
            RuleEndpoint::Address(s)
            | RuleEndpoint::Vm(s)
            | RuleEndpoint::VmId(s)
            | RuleEndpoint::Group(s)
            | RuleEndpoint::IpSet(s) => s,
        })) {
            if t.len() > MAX_FIREWALL_TEXT || t.chars().any(char::is_control) {
                return bad(format!(
                    "a firewall name or address of {} bytes is too long (limit {MAX_FIREWALL_TEXT}) or has control characters",
                    t.len()
                ));
            }
        }
        if self.not_carried.iter().any(|n| n.reason.len() > 1024) {
            return bad("a not-carried reason is longer than 1024 bytes".into());
        }
        Ok(())
    }

    /// What is wrong with the rules on their own, every problem at once: malformed
    /// addresses, references to groups or IP sets that are not defined, duplicate ids and
    /// names, ports on a protocol without ports. VM references are the cloud's to check.
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        let origin = if self.origin.is_empty() {
            "firewall rules".to_owned()
        } else {
            format!("firewall rules ({})", self.origin)
        };
        let mut seen = std::collections::HashSet::new();
        for (i, g) in self.groups.iter().enumerate() {
            if g.name.is_empty() || !seen.insert(("group", g.name.as_str())) {
                problems.push(format!(
                    "{origin}: group #{} has an empty or duplicate name {:?}",
                    i + 1,
                    g.name
                ));
            }
        }
        for (i, s) in self.ip_sets.iter().enumerate() {
            if s.name.is_empty() || !seen.insert(("ip_set", s.name.as_str())) {
                problems.push(format!(
                    "{origin}: IP set #{} has an empty or duplicate name {:?}",
                    i + 1,
                    s.name
                ));
            }
            for a in &s.addresses {
                if !is_address(a) {
                    problems.push(format!(
                        "{origin}: IP set {:?}: {a:?} is not an IP address, CIDR block or range; write it like 10.0.0.0/24 or 10.0.0.1-10.0.0.9",
                        s.name
                    ));
                }
            }
        }
        let check = |where_: &str, e: &RuleEndpoint, problems: &mut Vec<String>| {
            match e {
            RuleEndpoint::Address(a) if !is_address(a) => problems.push(format!(
                "{origin}: {where_}: {a:?} is not an IP address, CIDR block or range; write it like 10.0.0.0/24 or 10.0.0.1-10.0.0.9"
            )),
            RuleEndpoint::Group(g) if !seen.contains(&("group", g.as_str())) => problems.push(format!(
                "{origin}: {where_}: group {g:?} is not defined; add it to \"groups\" or remove the reference"
            )),
            RuleEndpoint::IpSet(s) if !seen.contains(&("ip_set", s.as_str())) => problems.push(format!(
                "{origin}: {where_}: IP set {s:?} is not defined; add it to \"ip_sets\" or remove the reference"
            )),
            RuleEndpoint::Vm(v) | RuleEndpoint::VmId(v) if v.is_empty() => {
                problems.push(format!("{origin}: {where_}: {} is empty", e.describe()))
            }
            _ => {}
        }
        };
        for g in &self.groups {
            for m in &g.members {
                check(&format!("group {:?} member", g.name), m, &mut problems);
            }
        }
        let mut ids = std::collections::HashSet::new();
        for r in &self.rules {
            let rule = format!("rule {} {:?}", r.id, r.name);
            if r.id.is_empty() || !ids.insert(r.id.as_str()) {
                problems.push(format!(
                    "{origin}: {rule}: the rule id is empty or used by another rule; give each rule its own id"
                ));
            }
            if r.name.is_empty() {
                problems.push(format!("{origin}: {rule}: the rule has no name"));
            }
            for (what, list) in [
                ("source", &r.sources),
                ("destination", &r.destinations),
                ("applied-to", &r.applied_to),
            ] {
                for e in list {
                    check(&format!("{rule} {what}"), e, &mut problems);
                }
            }
            for s in &r.services {
                if !s.ports.is_empty() && !matches!(s.protocol, Protocol::Tcp | Protocol::Udp) {
                    problems.push(format!(
                        "{origin}: {rule}: ports are given for {:?}, which has none; give ports only for TCP or UDP",
                        s.protocol
                    ));
                }
                for p in &s.ports {
                    if p.from == 0 || p.from > p.to {
                        problems.push(format!(
                            "{origin}: {rule}: port range {p} is not within 1-65535 with its start before its end"
                        ));
                    }
                }
            }
        }
        problems
    }
}

/// A NIC as it is (or would be) in the cloud.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NicMapping {
    pub key: String,
    pub source_network: String,
    pub network_id: String,
    pub network_name: String,
    /// The MAC kept from the source; `None` if the source had none (the cloud assigns one).
    pub mac: Option<String>,
}

/// A disk as it is (or would be) in the cloud.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReportDisk {
    pub key: String,
    pub capacity: u64,
    /// The datastore the disk is on (the VM's, or the one chosen for this disk).
    pub datastore_id: String,
    pub datastore_name: String,
    /// `[datastore] vm/file`, as the .vmx and the inventory name the disk; known once
    /// committed.
    pub path: Option<String>,
    /// `vmdk`, `qcow2` or `raw`: the plan's format, else its datastore's. Reports stored
    /// before protocol version 3 have none (their disks all had the report's format).
    #[serde(default)]
    pub format: String,
}

/// A rule carried into the cloud domain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CarriedRule {
    pub id: String,
    pub name: String,
    pub disabled: bool,
}

/// What a migration created in the cloud domain, or (for a plan that was only validated)
/// what it would create: the fields that only a commit knows are then `None`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationReport {
    pub migration_id: Option<String>,
    pub vm_name: String,
    pub vm_id: Option<String>,
    pub vm_path: Option<String>,
    pub folder_id: String,
    pub folder_name: String,
    pub datastore_id: String,
    pub datastore_name: String,
    pub host_id: String,
    pub host_name: String,
    /// `vmdk`, `qcow2` or `raw`: the format of the disks on the VM's datastore. A disk
    /// placed on another datastore takes that one's ([`ReportDisk::format`]).
    pub disk_format: String,
    pub num_cpus: u32,
    pub memory_mib: u64,
    pub disks: Vec<ReportDisk>,
    pub logical_bytes: u64,
    /// Of the logical bytes, those in all-zero chunks (never sent); known once moved.
    pub zero_bytes: Option<u64>,
    pub nics: Vec<NicMapping>,
    pub rules_carried: Vec<CarriedRule>,
    pub not_carried: Vec<NotCarried>,
    /// RFC 3339, UTC.
    pub committed_at: Option<String>,
    pub cluster_id: String,
    pub cluster_name: String,
    pub resource_pool_id: String,
    pub resource_pool_name: String,
}

impl MigrationReport {
    /// A few lines for people: NICs, rules carried and not carried.
    pub fn to_text(&self) -> String {
        let mut out = format!(
            "placement: folder {} ({}), cluster {} ({}), host {} ({}), resource pool {} ({}), datastore {} ({})\n",
            self.folder_name,
            self.folder_id,
            self.cluster_name,
            self.cluster_id,
            self.host_name,
            self.host_id,
            self.resource_pool_name,
            self.resource_pool_id,
            self.datastore_name,
            self.datastore_id,
        );
        for d in &self.disks {
            out.push_str(&format!(
                "disk {}: {} bytes on datastore {} ({}){}{}\n",
                d.key,
                d.capacity,
                d.datastore_name,
                d.datastore_id,
                if d.format.is_empty() {
                    String::new()
                } else {
                    format!(" as {}", d.format)
                },
                d.path.as_deref().map(|p| format!(", {p}")).unwrap_or_default()
            ));
        }
        for n in &self.nics {
            out.push_str(&format!(
                "nic {}: {:?} -> {} ({}), mac {}\n",
                n.key,
                n.source_network,
                n.network_name,
                n.network_id,
                n.mac
                    .as_deref()
                    .map_or("assigned by the cloud".to_owned(), |m| format!("{m} kept"))
            ));
        }
        let ids: Vec<&str> = self.rules_carried.iter().map(|r| r.id.as_str()).collect();
        out.push_str(&format!(
            "firewall rules carried: {}{}\n",
            self.rules_carried.len(),
            if ids.is_empty() {
                String::new()
            } else {
                format!(" ({})", ids.join(", "))
            }
        ));
        out.push_str(&format!("not carried: {}\n", self.not_carried.len()));
        for n in &self.not_carried {
            out.push_str(&format!("  - {} {:?}: {}\n", n.kind.as_str(), n.name, n.reason));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> FirewallSpec {
        FirewallSpec {
            origin: "web01.dfw.json".into(),
            source_vm: "web01".into(),
            rules: vec![FirewallRule {
                id: "1001".into(),
                name: "https-in".into(),
                action: RuleAction::Allow,
                direction: RuleDirection::In,
                sources: vec![RuleEndpoint::IpSet("clients".into()), RuleEndpoint::Group("lb".into())],
                destinations: vec![RuleEndpoint::Vm("web01".into())],
                services: vec![RuleService {
                    protocol: Protocol::Tcp,
                    ports: vec![PortRange { from: 443, to: 443 }, PortRange { from: 8000, to: 8080 }],
                }],
                applied_to: vec![],
                disabled: false,
            }],
            groups: vec![FirewallGroup {
                name: "lb".into(),
                members: vec![RuleEndpoint::Address("10.0.0.0/24".into())],
            }],
            ip_sets: vec![IpSet {
                name: "clients".into(),
                addresses: vec!["192.168.1.1-192.168.1.9".into(), "2001:db8::/32".into()],
            }],
            not_carried: vec![NotCarried::new(NotCarriedKind::SpoofGuard, "default")],
        }
    }

    #[test]
    fn a_good_spec_has_no_problems_and_round_trips_both_encodings() {
        let s = spec();
        assert_eq!(s.problems(), Vec::<String>::new());
        s.check_limits().unwrap();
        let bytes = postcard::to_stdvec(&s).unwrap();
        assert_eq!(postcard::from_bytes::<FirewallSpec>(&bytes).unwrap(), s);
        let json = serde_json::to_string(&s).unwrap();
        assert!(json.contains(r#""ports":["443","8000-8080"]"#), "{json}");
        assert!(json.contains(r#"{"ip_set":"clients"}"#), "{json}");
        assert_eq!(serde_json::from_str::<FirewallSpec>(&json).unwrap(), s);
    }

    #[test]
    fn every_problem_is_listed_at_once() {
        let mut s = spec();
        s.rules[0].sources.push(RuleEndpoint::Address("10.0.0.300/24".into()));
        s.rules[0].sources.push(RuleEndpoint::Group("nope".into()));
        s.rules[0].destinations.push(RuleEndpoint::IpSet("missing".into()));
        s.rules[0].services.push(RuleService {
            protocol: Protocol::Icmp,
            ports: vec![PortRange { from: 9, to: 1 }],
        });
        s.rules.push(s.rules[0].clone());
        s.ip_sets[0].addresses.push("10.0.0.0/33".into());
        let problems = s.problems();
        let has = |needle: &str| problems.iter().any(|p| p.contains(needle));
        assert!(has("\"10.0.0.300/24\" is not an IP address"), "{problems:#?}");
        assert!(has("group \"nope\" is not defined"));
        assert!(has("IP set \"missing\" is not defined"));
        assert!(has("ports are given for Icmp"));
        assert!(has("port range 9-1"));
        assert!(has("used by another rule"));
        assert!(has("\"10.0.0.0/33\""));
        assert!(problems
            .iter()
            .all(|p| p.starts_with("firewall rules (web01.dfw.json)")));
    }

    #[test]
    fn addresses() {
        for ok in [
            "10.0.0.1",
            "10.0.0.0/8",
            "0.0.0.0/0",
            "fe80::1",
            "2001:db8::/48",
            "10.0.0.1-10.0.0.2",
        ] {
            assert!(is_address(ok), "{ok}");
        }
        for bad in [
            "10.0.0",
            "10.0.0.0/",
            "10.0.0.0/+8",
            "10.0.0.9-10.0.0.1",
            "10.0.0.1-::1",
            "any",
            "",
        ] {
            assert!(!is_address(bad), "{bad}");
        }
    }

    #[test]
    fn limits_bound_counts_and_text() {
        let mut s = spec();
        s.rules = vec![s.rules[0].clone(); MAX_FIREWALL_RULES + 1];
        assert!(s.check_limits().is_err());
        let mut s = spec();
        s.groups[0].name = "x".repeat(MAX_FIREWALL_TEXT + 1);
        assert!(s.check_limits().is_err());
        let mut s = spec();
        s.groups[0].members = vec![RuleEndpoint::Vm("a".into()); MAX_FIREWALL_LIST + 1];
        assert!(s.check_limits().is_err());
    }

    #[test]
    fn vm_references_are_resolved() {
        let mut s = spec();
        s.groups[0].members.push(RuleEndpoint::Vm("web01".into()));
        s.groups[0].members.push(RuleEndpoint::Vm("elsewhere".into()));
        s.resolve_vms(|name| (name == "web01").then(|| "vm-14".to_owned()));
        assert_eq!(s.rules[0].destinations, vec![RuleEndpoint::VmId("vm-14".into())]);
        assert_eq!(s.groups[0].members[1], RuleEndpoint::VmId("vm-14".into()));
        assert_eq!(s.vm_references().collect::<Vec<_>>(), vec!["elsewhere"]);
    }
}
