//! The PropertyCollector's semantics, over a [`Snapshot`]: which objects a
//! `PropertyFilterSpec` selects (ObjectSpec, TraversalSpec, SelectionSpec by name, skip)
//! and which properties of each (PropertySpec: type, all, pathSet).
//!
//! Selection walks with an explicit work list and visits each (object, traversal spec)
//! pair once, so a spec that loops (parent and childEntity, say) ends, and a deep or
//! hostile spec cannot grow the stack.

use std::collections::{HashMap, HashSet};

use super::fault::Fault;
use super::model::{check_path, is_a, known_type, properties, Snapshot};
use super::value::{MoRef, Value};
use super::xml::Element;

#[derive(Debug, Clone, PartialEq)]
pub struct PropertySpec {
    pub kind: String,
    pub all: bool,
    pub path_set: Vec<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Selection {
    /// A SelectionSpec that names a TraversalSpec defined elsewhere in the filter.
    Named(String),
    Traversal(TraversalSpec),
}

#[derive(Debug, Clone, PartialEq)]
pub struct TraversalSpec {
    pub name: Option<String>,
    pub kind: String,
    pub path: String,
    pub skip: bool,
    pub select_set: Vec<Selection>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ObjectSpec {
    pub obj: MoRef,
    pub skip: bool,
    pub select_set: Vec<Selection>,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct FilterSpec {
    pub prop_set: Vec<PropertySpec>,
    pub object_set: Vec<ObjectSpec>,
}

/// One object's answer: its reference and the properties asked for that are set.
#[derive(Debug, Clone, PartialEq)]
pub struct ObjectContent {
    pub obj: MoRef,
    pub props: Vec<(String, Value)>,
}

/// A moref element (`<obj type="VirtualMachine">vm-1</obj>`).
pub fn moref(e: &Element) -> MoRef {
    MoRef {
        kind: e.type_attr.clone().unwrap_or_default(),
        value: e.text.trim().to_owned(),
    }
}

fn required<'a>(e: &'a Element, name: &str, what: &str) -> Result<&'a Element, Fault> {
    e.child(name)
        .ok_or_else(|| Fault::invalid_argument(name, format!("{what} has no {name}; it is required")))
}

/// Reads a `PropertyFilterSpec` element.
pub fn parse_filter_spec(e: &Element) -> Result<FilterSpec, Fault> {
    let mut spec = FilterSpec::default();
    for p in e.all("propSet") {
        let kind = required(p, "type", "a PropertySpec")?.text.trim().to_owned();
        if !known_type(&kind) {
            return Err(Fault::invalid_argument(
                "type",
                format!("PropertySpec.type {kind:?} is not a managed object type this endpoint answers"),
            ));
        }
        spec.prop_set.push(PropertySpec {
            kind,
            all: p.bool_of("all")?.unwrap_or(false),
            path_set: p.all("pathSet").map(|s| s.text.trim().to_owned()).collect(),
        });
    }
    for o in e.all("objectSet") {
        spec.object_set.push(ObjectSpec {
            obj: moref(required(o, "obj", "an ObjectSpec")?),
            skip: o.bool_of("skip")?.unwrap_or(false),
            select_set: o.all("selectSet").map(parse_selection).collect::<Result<_, _>>()?,
        });
    }
    if spec.prop_set.is_empty() || spec.object_set.is_empty() {
        return Err(Fault::invalid_argument(
            "specSet",
            "a PropertyFilterSpec needs at least one propSet and one objectSet",
        ));
    }
    Ok(spec)
}

fn parse_selection(e: &Element) -> Result<Selection, Fault> {
    // A TraversalSpec is known by its xsi:type, or by its fields when a client leaves it out.
    let is_traversal = e.xsi_type.as_deref() == Some("TraversalSpec") || e.child("path").is_some();
    let name = e.text_of("name").map(str::to_owned);
    if !is_traversal {
        return name
            .map(Selection::Named)
            .ok_or_else(|| Fault::invalid_argument("selectSet", "a SelectionSpec without a name selects nothing"));
    }
    Ok(Selection::Traversal(TraversalSpec {
        name,
        kind: required(e, "type", "a TraversalSpec")?.text.trim().to_owned(),
        path: required(e, "path", "a TraversalSpec")?.text.trim().to_owned(),
        skip: e.bool_of("skip")?.unwrap_or(false),
        select_set: e.all("selectSet").map(parse_selection).collect::<Result<_, _>>()?,
    }))
}

/// Every named TraversalSpec of a filter, by name.
fn named_specs(spec: &FilterSpec) -> HashMap<&str, &TraversalSpec> {
    fn add<'a>(set: &'a [Selection], out: &mut HashMap<&'a str, &'a TraversalSpec>) {
        for s in set {
            if let Selection::Traversal(t) = s {
                if let Some(name) = &t.name {
                    out.entry(name.as_str()).or_insert(t);
                }
                add(&t.select_set, out);
            }
        }
    }
    let mut out = HashMap::new();
    for o in &spec.object_set {
        add(&o.select_set, &mut out);
    }
    out
}

/// The objects a filter selects, each once, in the order first reached.
pub fn select(snapshot: &Snapshot, spec: &FilterSpec) -> Result<Vec<MoRef>, Fault> {
    let named = named_specs(spec);
    let mut out = Vec::new();
    let mut included = HashSet::new();
    let mut visited: HashSet<(MoRef, usize)> = HashSet::new();
    for o in &spec.object_set {
        let root = snapshot.resolve(&o.obj)?;
        let mut work: Vec<(MoRef, &[Selection], bool)> = vec![(root, &o.select_set, o.skip)];
        while let Some((obj, select_set, skip)) = work.pop() {
            if !skip && included.insert(obj.clone()) {
                out.push(obj.clone());
            }
            let mut next = Vec::new();
            for sel in select_set {
                let ts = match sel {
                    Selection::Traversal(t) => t,
                    Selection::Named(name) => named.get(name.as_str()).copied().ok_or_else(|| {
                        Fault::invalid_argument(
                            "selectSet",
                            format!("SelectionSpec {name:?} names no TraversalSpec in this filter"),
                        )
                    })?,
                };
                if !is_a(&obj.kind, &ts.kind) {
                    continue;
                }
                if !visited.insert((obj.clone(), ts as *const TraversalSpec as usize)) {
                    continue;
                }
                let value = snapshot.get(&obj, &ts.path)?;
                for child in value.map(|v| v.morefs()).unwrap_or_default() {
                    next.push((child, ts.select_set.as_slice(), ts.skip));
                }
            }
            // Reversed onto the stack: children are taken in the order the property lists them.
            work.extend(next.into_iter().rev());
        }
    }
    Ok(out)
}

/// The property paths a filter asks of an object of `kind`; `None` if no PropertySpec
/// covers its type (vim25 leaves such an object out).
pub fn paths_for(spec: &FilterSpec, kind: &str) -> Option<Vec<String>> {
    let mut paths: Vec<String> = Vec::new();
    let mut matched = false;
    for p in spec.prop_set.iter().filter(|p| is_a(kind, &p.kind)) {
        matched = true;
        let asked: Vec<String> = if p.all {
            properties(kind).iter().map(|s| (*s).to_owned()).collect()
        } else {
            p.path_set.clone()
        };
        for path in asked {
            if !paths.contains(&path) {
                paths.push(path);
            }
        }
    }
    matched.then_some(paths)
}

/// The properties `paths` of `obj`.
pub fn contents(snapshot: &Snapshot, obj: &MoRef, paths: &[String]) -> Result<ObjectContent, Fault> {
    let mut props = Vec::new();
    for path in paths {
        if let Some(value) = snapshot.get(obj, path)? {
            props.push((path.clone(), value));
        }
    }
    Ok(ObjectContent {
        obj: obj.clone(),
        props,
    })
}

/// The objects and paths of a whole filter, before any property is computed (a paged
/// retrieval keeps this list and computes one page at a time).
pub fn plan(snapshot: &Snapshot, spec: &FilterSpec) -> Result<Vec<(MoRef, Vec<String>)>, Fault> {
    let mut out = Vec::new();
    for obj in select(snapshot, spec)? {
        if let Some(paths) = paths_for(spec, &obj.kind) {
            // A bad path fails the call up front, as vCenter does, not on a later page.
            // (govmomi's simulator reports it in the object's missingSet instead; vCenter
            // and pyvmomi raise InvalidProperty for the call.)
            for path in &paths {
                check_path(&obj.kind, path)?;
            }
            out.push((obj, paths));
        }
    }
    Ok(out)
}

/// Writes ObjectContents as elements `name`.
pub fn write_contents(out: &mut String, name: &str, objects: &[ObjectContent]) {
    for o in objects {
        out.push_str(&format!("<{name} xsi:type=\"ObjectContent\">"));
        Value::Ref(o.obj.clone()).write(out, "obj");
        for (path, value) in &o.props {
            out.push_str("<propSet xsi:type=\"DynamicProperty\">");
            Value::Str(path.clone()).write_field(out, "name");
            value.write(out, "val");
            out.push_str("</propSet>");
        }
        out.push_str(&format!("</{name}>"));
    }
}
