//! A VM's distributed-firewall rules, read from a JSON file next to its `.vmx` (or given
//! with `edge-agent migrate --firewall FILE`), modelled on NSX DFW.
//!
//! The file is `<stem>.dfw.json` beside `<stem>.vmx` (or `.ovf` / `.ova`). Its shape:
//!
//! ```json
//! { "rules": [ { "id": "1001", "name": "https-in", "action": "ALLOW", "direction": "IN",
//!                "sources": [ {"ip_set": "clients"} ], "destinations": [ {"vm": "web01"} ],
//!                "services": [ {"protocol": "TCP", "ports": ["443", "8000-8080"]} ],
//!                "applied_to": [], "disabled": false } ],
//!   "groups":  [ { "name": "web-tier", "members": [ {"vm": "web01"}, {"address": "10.0.0.0/24"} ] } ],
//!   "ip_sets": [ { "name": "clients", "addresses": ["192.168.1.0/24"] } ],
//!   "service_composer_policies": [...], "spoofguard": [...], "security_tags": [...],
//!   "netx_rules": [...], "edge_firewall_rules": [...] }
//! ```
//!
//! This module checks the shape (every key known, every value of its type, sizes bounded)
//! and sorts out what the cloud domain cannot enforce: the last five sections, group
//! members that are security tags, and applied-to targets that are NSX Edges become
//! not-carried items, each listed in the migration report. Whether addresses are well
//! formed and references resolve is the cloud's check (it cannot trust an edge to have
//! made it), so `edge-agent plan` lists those problems together with the placement's.

use std::path::{Path, PathBuf};

use gateway::plan::{FirewallGroup, FirewallRule, FirewallSpec, IpSet, NotCarried, NotCarriedKind};
use serde_json::{Map, Value};

use super::SourceError;

/// Largest rules file: far above a VM's rules, and small enough that the plan carrying
/// them stays within one control frame.
pub const MAX_FIREWALL_FILE: u64 = 256 * 1024;

/// The suffix of a rules file next to a VM: `web01.vmx` has `web01.dfw.json`.
pub const FIREWALL_SUFFIX: &str = ".dfw.json";

/// Sections of NSX configuration that have no equivalent in the cloud domain.
const NOT_CARRIED_SECTIONS: [(&str, NotCarriedKind); 5] = [
    ("service_composer_policies", NotCarriedKind::ServiceComposerPolicy),
    ("spoofguard", NotCarriedKind::SpoofGuard),
    ("security_tags", NotCarriedKind::SecurityTag),
    ("netx_rules", NotCarriedKind::NetX),
    ("edge_firewall_rules", NotCarriedKind::EdgeFirewall),
];

/// The rules file that belongs next to the VM file `vm_file`.
pub fn default_path(vm_file: &Path) -> PathBuf {
    let stem = vm_file
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    vm_file.with_file_name(format!("{stem}{FIREWALL_SUFFIX}"))
}

/// Reads the rules file next to `vm_file` if there is one; no file means no rules.
pub fn find(vm_file: &Path, vm_name: &str) -> Result<FirewallSpec, SourceError> {
    let path = default_path(vm_file);
    if !path.exists() {
        return Ok(FirewallSpec::default());
    }
    read(&path, vm_name)
}

/// Reads and checks the rules file at `path` for the VM named `vm_name` at the source.
pub fn read(path: &Path, vm_name: &str) -> Result<FirewallSpec, SourceError> {
    let io = |action, source| SourceError::Io {
        path: path.to_owned(),
        action,
        source,
    };
    let size = std::fs::metadata(path)
        .map_err(|e| io("inspect the firewall rules file", e))?
        .len();
    if size > MAX_FIREWALL_FILE {
        return Err(SourceError::TooLarge {
            path: path.to_owned(),
            what: "firewall rules file",
            size,
            limit: MAX_FIREWALL_FILE,
        });
    }
    let text = std::fs::read(path).map_err(|e| io("read the firewall rules file", e))?;
    let origin = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    parse(&text, &origin, vm_name).map_err(|(rule, message)| SourceError::Firewall {
        path: path.to_owned(),
        rule,
        message,
    })
}

/// A problem: the rule (or section) it is in, if any, and what is wrong and what to do.
type Problem = (Option<String>, String);

fn problem(message: impl Into<String>) -> Problem {
    (None, message.into())
}

/// Parses a rules file's bytes. `origin` names it in the plan.
pub fn parse(text: &[u8], origin: &str, vm_name: &str) -> Result<FirewallSpec, Problem> {
    let root: Value = serde_json::from_slice(text).map_err(|e| {
        problem(format!(
            "not valid JSON ({e}); the file must be one JSON object with \"rules\", \"groups\", \"ip_sets\"..."
        ))
    })?;
    let Value::Object(mut root) = root else {
        return Err(problem(
            "the file must be one JSON object with \"rules\", \"groups\", \"ip_sets\"...",
        ));
    };
    let mut spec = FirewallSpec {
        origin: origin.to_owned(),
        source_vm: vm_name.to_owned(),
        ..FirewallSpec::default()
    };
    let known: Vec<&str> = ["rules", "groups", "ip_sets"]
        .into_iter()
        .chain(NOT_CARRIED_SECTIONS.iter().map(|(k, _)| *k))
        .collect();
    // A misspelt section would otherwise drop its rules without a word.
    if let Some(unknown) = root.keys().find(|k| !known.contains(&k.as_str())) {
        return Err(problem(format!(
            "unknown section {unknown:?}; the sections are {}",
            known.join(", ")
        )));
    }
    for (section, kind) in NOT_CARRIED_SECTIONS {
        if let Some(v) = root.remove(section) {
            not_carried(section, kind, v, &mut spec.not_carried)?;
        }
    }
    for (i, v) in array(&mut root, "ip_sets")?.into_iter().enumerate() {
        let what = format!("IP set #{}{}", i + 1, name_of(&v));
        spec.ip_sets
            .push(serde_json::from_value::<IpSet>(v).map_err(|e| (Some(what), e.to_string()))?);
    }
    for (i, mut v) in array(&mut root, "groups")?.into_iter().enumerate() {
        let what = format!("group #{}{}", i + 1, name_of(&v));
        // Members by security tag cannot be resolved in the cloud domain.
        let group_name = v.get("name").and_then(Value::as_str).unwrap_or("").to_owned();
        if let Some(Value::Array(members)) = v.get_mut("members") {
            members.retain(|m| match m.get("security_tag").and_then(Value::as_str) {
                Some(tag) => {
                    spec.not_carried.push(NotCarried::new(
                        NotCarriedKind::SecurityTag,
                        format!("{tag} (member of group {group_name})"),
                    ));
                    false
                }
                None => true,
            });
        }
        spec.groups
            .push(serde_json::from_value::<FirewallGroup>(v).map_err(|e| (Some(what), e.to_string()))?);
    }
    for (i, mut v) in array(&mut root, "rules")?.into_iter().enumerate() {
        let what = format!("rule #{}{}", i + 1, name_of(&v));
        let Value::Object(rule) = &mut v else {
            return Err((Some(what), "a rule must be a JSON object".into()));
        };
        // NSX rule ids are numbers; the plan keeps them as text. Absent: the position.
        match rule.get("id") {
            None => {
                rule.insert("id".into(), Value::String((i + 1).to_string()));
            }
            Some(Value::Number(n)) => {
                let id = n.to_string();
                rule.insert("id".into(), Value::String(id));
            }
            Some(_) => {}
        }
        if edge_only(rule, &mut spec.not_carried) {
            continue;
        }
        spec.rules
            .push(serde_json::from_value::<FirewallRule>(v).map_err(|e| (Some(what), e.to_string()))?);
    }
    spec.check_limits().map_err(|e| problem(e.to_string()))?;
    Ok(spec)
}

/// ` "name"` of a JSON object that has one, for messages.
fn name_of(v: &Value) -> String {
    ["name", "display_name"]
        .iter()
        .find_map(|k| v.get(k).and_then(Value::as_str))
        .map(|n| format!(" {n:?}"))
        .unwrap_or_default()
}

fn array(root: &mut Map<String, Value>, key: &str) -> Result<Vec<Value>, Problem> {
    match root.remove(key) {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(items)) => Ok(items),
        Some(_) => Err(problem(format!("{key:?} must be a JSON array"))),
    }
}

/// A section with no equivalent: each entry (a name, or an object with a name) becomes a
/// not-carried item. SpoofGuard is often one object (the policy): one item.
fn not_carried(section: &str, kind: NotCarriedKind, v: Value, out: &mut Vec<NotCarried>) -> Result<(), Problem> {
    let items = match v {
        Value::Array(items) => items,
        Value::Null => Vec::new(),
        one @ Value::Object(_) => vec![one],
        _ => return Err(problem(format!("{section:?} must be a JSON array of names or objects"))),
    };
    for (i, item) in items.into_iter().enumerate() {
        let name = match &item {
            Value::String(s) => s.clone(),
            Value::Object(o) => ["name", "display_name", "tag", "id", "mode"]
                .iter()
                .find_map(|k| match o.get(*k) {
                    Some(Value::String(s)) => Some(s.clone()),
                    Some(Value::Number(n)) => Some(n.to_string()),
                    _ => None,
                })
                .unwrap_or_else(|| format!("{section} #{}", i + 1)),
            _ => {
                return Err((
                    Some(format!("{section} #{}", i + 1)),
                    "each entry must be a name or a JSON object".into(),
                ))
            }
        };
        out.push(NotCarried::new(kind, name));
    }
    Ok(())
}

/// Takes NSX Edge targets out of a rule's applied-to list (each is listed as not carried).
/// True if the rule applied to Edges only: it is an Edge firewall rule, not carried at all.
fn edge_only(rule: &mut Map<String, Value>, out: &mut Vec<NotCarried>) -> bool {
    let rule_name = rule.get("name").and_then(Value::as_str).unwrap_or("").to_owned();
    let Some(Value::Array(targets)) = rule.get_mut("applied_to") else {
        return false;
    };
    let before = targets.len();
    let mut edges = Vec::new();
    targets.retain(|t| match t.get("edge").and_then(Value::as_str) {
        Some(edge) => {
            edges.push(edge.to_owned());
            false
        }
        None => true,
    });
    if edges.is_empty() {
        return false;
    }
    let whole = before == edges.len();
    for edge in edges {
        let name = if whole {
            format!("rule {rule_name} (applied to Edge {edge})")
        } else {
            format!("Edge {edge} in the applied-to of rule {rule_name}")
        };
        out.push(NotCarried::new(NotCarriedKind::EdgeFirewall, name));
    }
    whole
}

#[cfg(test)]
mod tests {
    use super::*;
    use gateway::plan::{PortRange, Protocol, RuleAction, RuleDirection, RuleEndpoint};

    const GOOD: &str = r#"{
        "rules": [
            {"id": 1001, "name": "https-in", "action": "ALLOW", "direction": "IN",
             "sources": [{"ip_set": "clients"}, {"group": "lb"}],
             "destinations": [{"vm": "web01"}],
             "services": [{"protocol": "TCP", "ports": ["443", 8443, "8000-8080"]}]},
            {"name": "deny-rest", "action": "DROP", "disabled": true},
            {"id": "1003", "name": "edge-nat", "action": "ALLOW", "applied_to": [{"edge": "edge-1"}]},
            {"id": "1004", "name": "mixed", "action": "REJECT", "direction": "OUT",
             "applied_to": [{"vm": "web01"}, {"edge": "edge-2"}]}
        ],
        "groups": [{"name": "lb", "members": [{"address": "10.0.0.0/24"}, {"security_tag": "ST-LB"}]}],
        "ip_sets": [{"name": "clients", "addresses": ["192.168.1.0/24"]}],
        "service_composer_policies": [{"name": "PCI"}],
        "spoofguard": {"mode": "TOFU"},
        "security_tags": ["ST-Web"],
        "netx_rules": [{"display_name": "redirect-to-ips"}],
        "edge_firewall_rules": [{"id": 7}]
    }"#;

    #[test]
    fn a_good_file_carries_rules_and_lists_what_it_cannot() {
        let spec = parse(GOOD.as_bytes(), "web01.dfw.json", "web01").unwrap();
        assert_eq!(spec.origin, "web01.dfw.json");
        assert_eq!(spec.source_vm, "web01");
        let ids: Vec<&str> = spec.rules.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(ids, ["1001", "2", "1004"], "1003 applies to an Edge only");
        let r = &spec.rules[0];
        assert_eq!(
            (r.action, r.direction, r.disabled),
            (RuleAction::Allow, RuleDirection::In, false)
        );
        assert_eq!(r.destinations, vec![RuleEndpoint::Vm("web01".into())]);
        assert_eq!(r.services[0].protocol, Protocol::Tcp);
        assert_eq!(
            r.services[0].ports,
            vec![
                PortRange { from: 443, to: 443 },
                PortRange { from: 8443, to: 8443 },
                PortRange { from: 8000, to: 8080 }
            ]
        );
        assert_eq!(spec.rules[1].direction, RuleDirection::InOut, "NSX's default");
        assert!(spec.rules[1].disabled);
        assert_eq!(spec.rules[2].applied_to, vec![RuleEndpoint::Vm("web01".into())]);
        assert_eq!(
            spec.groups[0].members,
            vec![RuleEndpoint::Address("10.0.0.0/24".into())]
        );
        let kinds: Vec<(NotCarriedKind, &str)> = spec.not_carried.iter().map(|n| (n.kind, n.name.as_str())).collect();
        assert_eq!(
            kinds,
            [
                (NotCarriedKind::ServiceComposerPolicy, "PCI"),
                (NotCarriedKind::SpoofGuard, "TOFU"),
                (NotCarriedKind::SecurityTag, "ST-Web"),
                (NotCarriedKind::NetX, "redirect-to-ips"),
                (NotCarriedKind::EdgeFirewall, "7"),
                (NotCarriedKind::SecurityTag, "ST-LB (member of group lb)"),
                (NotCarriedKind::EdgeFirewall, "rule edge-nat (applied to Edge edge-1)"),
                (
                    NotCarriedKind::EdgeFirewall,
                    "Edge edge-2 in the applied-to of rule mixed"
                ),
            ]
        );
        assert!(spec.not_carried.iter().all(|n| !n.reason.is_empty()));
        assert!(spec.problems().is_empty(), "{:?}", spec.problems());
    }

    fn err(text: &str) -> (Option<String>, String) {
        parse(text.as_bytes(), "x.dfw.json", "x").unwrap_err()
    }

    #[test]
    fn bad_files_name_the_rule_and_say_what_is_wrong() {
        let (_, m) = err("{");
        assert!(m.contains("not valid JSON"), "{m}");
        let (_, m) = err("[]");
        assert!(m.contains("one JSON object"), "{m}");
        let (_, m) = err(r#"{"rulez": []}"#);
        assert!(m.contains("unknown section \"rulez\""), "{m}");
        let (_, m) = err(r#"{"rules": {}}"#);
        assert!(m.contains("\"rules\" must be a JSON array"), "{m}");
        let (rule, m) = err(r#"{"rules": [{"name": "a", "action": "ALLOW"}, {"name": "ssh", "action": "PERMIT"}]}"#);
        assert_eq!(rule.as_deref(), Some("rule #2 \"ssh\""));
        assert!(m.contains("PERMIT") && m.contains("ALLOW"), "{m}");
        let (rule, m) = err(r#"{"rules": [{"name": "a", "action": "ALLOW", "direction": "UP"}]}"#);
        assert_eq!(rule.as_deref(), Some("rule #1 \"a\""));
        assert!(m.contains("UP"), "{m}");
        let (_, m) = err(r#"{"rules": [{"name": "a", "action": "ALLOW", "source": []}]}"#);
        assert!(m.contains("unknown field `source`"), "{m}");
        let (_, m) = err(
            r#"{"rules": [{"name": "a", "action": "ALLOW", "services": [{"protocol": "TCP", "ports": ["99999"]}]}]}"#,
        );
        assert!(m.contains("99999"), "{m}");
        let (_, m) = err(r#"{"rules": [{"name": "a", "action": "ALLOW", "sources": [{"host": "x"}]}]}"#);
        assert!(m.contains("host"), "{m}");
        let (rule, _) = err(r#"{"groups": [{"name": "g", "members": "x"}]}"#);
        assert_eq!(rule.as_deref(), Some("group #1 \"g\""));
        let (_, m) = err(r#"{"spoofguard": 3}"#);
        assert!(m.contains("spoofguard"), "{m}");
        // Counts are bounded like the plan's.
        let many: Vec<String> = (0..=gateway::plan::MAX_FIREWALL_RULES)
            .map(|i| format!(r#"{{"id": "{i}", "name": "r", "action": "DROP"}}"#))
            .collect();
        let (_, m) = err(&format!(r#"{{"rules": [{}]}}"#, many.join(",")));
        assert!(m.contains("more than the 512"), "{m}");
    }

    #[test]
    fn files_are_found_next_to_the_vm_bounded_and_named_in_errors() {
        let dir = tempfile::tempdir().unwrap();
        let vmx = dir.path().join("web01.vmx");
        assert_eq!(default_path(&vmx), dir.path().join("web01.dfw.json"));
        assert!(find(&vmx, "web01").unwrap().is_empty(), "no file, no rules");
        std::fs::write(dir.path().join("web01.dfw.json"), GOOD).unwrap();
        assert_eq!(find(&vmx, "web01").unwrap().rules.len(), 3);
        std::fs::write(
            dir.path().join("web01.dfw.json"),
            r#"{"rules": [{"name": "z", "action": 1}]}"#,
        )
        .unwrap();
        let e = find(&vmx, "web01").unwrap_err().to_string();
        assert!(e.contains("web01.dfw.json") && e.contains("rule #1 \"z\""), "{e}");
        std::fs::write(
            dir.path().join("web01.dfw.json"),
            vec![b' '; MAX_FIREWALL_FILE as usize + 1],
        )
        .unwrap();
        let e = find(&vmx, "web01").unwrap_err().to_string();
        assert!(e.contains("too large"), "{e}");
    }
}
