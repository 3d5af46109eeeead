//! The vim25 methods answered, and [`dispatch`], which gives every other method a
//! `NotSupported` fault. Every method but `RetrieveServiceContent`, `Login` and
//! `CurrentTime` needs a session.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use super::collector::{self, moref, FilterSpec};
use super::fault::Fault;
use super::model::{self, known_type, Extra, Snapshot, View};
use super::tasks::TaskRecord;
use super::value::{MoRef, Value};
use super::xml::{Call, Element};
use super::{Reply, SessionObjects};
use crate::api::error::{ApiError, ErrorKind};
use crate::api::session::{rfc3339_millis, Now, Session};
use crate::api::vcenter::power::{self, Action};
use crate::api::ApiState;

/// The most objects one page of `RetrievePropertiesEx` holds, whatever `maxObjects` says:
/// what bounds the memory a retrieval of a large inventory takes.
pub const MAX_PAGE: usize = 500;
/// The most container views, filters and unfinished paged retrievals one session holds.
/// Their ids (`view-N`, `filter-N`) are counters, never part of the session cookie, and
/// only their session finds them.
pub const MAX_VIEWS: usize = 1000;
pub const MAX_FILTERS: usize = 100;
pub const MAX_RETRIEVALS: usize = 16;
/// The longest `WaitForUpdates` waits before it answers "no change" (the API's request
/// time limit is 30 s; clients call again).
pub const MAX_WAIT: Duration = Duration::from_secs(20);

/// A property filter of `CreateFilter`: its spec and what `WaitForUpdates` last reported.
#[derive(Debug, Clone)]
pub(super) struct Filter {
    spec: FilterSpec,
    last: HashMap<MoRef, HashMap<String, String>>,
}

/// The pages a `RetrievePropertiesEx` has still to give.
#[derive(Debug, Clone)]
pub(super) struct Retrieval {
    rest: VecDeque<(MoRef, Vec<String>)>,
    page: usize,
    seq: u64,
}

#[derive(Debug, Clone)]
struct Ctx {
    token: String,
    session: Session,
}

/// The methods answered after a login (for `NotSupported` of every other).
const SYNC_METHODS: &[&str] = &[
    "Fetch",
    "RetrieveProperties",
    "RetrievePropertiesEx",
    "ContinueRetrievePropertiesEx",
    "CancelRetrievePropertiesEx",
    "CreateFilter",
    "DestroyPropertyFilter",
    "CreateContainerView",
    "DestroyView",
    "FindByInventoryPath",
    "FindByUuid",
    "FindAllByUuid",
    "FindChild",
];

pub(super) async fn dispatch(
    state: &ApiState,
    source: IpAddr,
    cookie: Option<String>,
    call: Call,
) -> Result<Reply, Fault> {
    let this = call
        .body
        .child("_this")
        .map(moref)
        .unwrap_or_else(|| MoRef::new("", ""));
    match call.method.as_str() {
        "RetrieveServiceContent" => {
            let st = state.clone();
            let body = blocking(move || service_content(&st)).await?;
            return Ok(reply(body, None));
        }
        "Login" => return login(state, source, &call.body).await,
        "CurrentTime" => {
            let mut body = String::new();
            Value::Time(rfc3339_millis(time::OffsetDateTime::now_utc())).write(&mut body, "returnval");
            return Ok(reply(body, None));
        }
        _ => {}
    }
    let ctx = cookie
        .and_then(|token| {
            let session = state.soap.sessions.touch(&token, Now::current())?;
            Some(Ctx { token, session })
        })
        .ok_or_else(|| Fault::not_authenticated(&this))?;
    let user = Some(ctx.session.principal.user.clone());
    let method = call.method.clone();
    let body = match method.as_str() {
        "Logout" => {
            state.soap.sessions.remove(&ctx.token);
            state.soap.objects().remove(&ctx.token);
            tracing::info!(user = ?ctx.session.principal.user, "SOAP session ended");
            String::new()
        }
        "WaitForUpdatesEx" | "WaitForUpdates" | "CheckForUpdates" => {
            wait_for_updates(state, &ctx, &call.body, &method).await?
        }
        "PowerOnVM_Task" | "PowerOffVM_Task" | "ResetVM_Task" => power_task(state, &ctx, &this, &method).await?,
        m if SYNC_METHODS.contains(&m) => {
            let st = state.clone();
            blocking(move || sync_call(&st, &ctx, &this, &call)).await?
        }
        other => return Err(Fault::not_supported(other)),
    };
    Ok(Reply {
        body,
        cookie: None,
        user,
    })
}

fn reply(body: String, user: Option<String>) -> Reply {
    Reply {
        body,
        cookie: None,
        user,
    }
}

async fn blocking<T: Send + 'static>(op: impl FnOnce() -> Result<T, Fault> + Send + 'static) -> Result<T, Fault> {
    tokio::task::spawn_blocking(op).await.unwrap_or_else(|e| {
        tracing::error!(error = %e, "SOAP call failed inside the endpoint");
        Err(Fault::new(
            "SystemError",
            "the call failed inside the endpoint; see its log",
        ))
    })
}

fn api(e: impl Into<ApiError>) -> Fault {
    Fault::from_api(&e.into())
}

fn service_content(state: &ApiState) -> Result<String, Fault> {
    let d = state.domain.inventory.domain().map_err(api)?;
    let root = d
        .folders
        .iter()
        .find(|f| f.parent.is_none())
        .map_or("group-d1", |f| f.id.as_str())
        .to_owned();
    let mut out = String::new();
    model::service_content(&root, &state.soap.instance_uuid).write(&mut out, "returnval");
    Ok(out)
}

fn user_session(session: &Session, objects: Option<&SessionObjects>) -> Value {
    let user = &session.principal.user;
    Value::Data(
        "UserSession",
        vec![
            ("key", Value::str(objects.map_or("", |o| o.key.as_str()))),
            ("userName", Value::str(user)),
            ("fullName", Value::str(user)),
            ("loginTime", Value::Time(rfc3339_millis(session.created))),
            ("lastActiveTime", Value::Time(rfc3339_millis(session.last_accessed))),
            ("locale", Value::str("en")),
            ("messageLocale", Value::str("en")),
            ("extensionSession", Value::Bool(false)),
            (
                "ipAddress",
                Value::Str(
                    objects
                        .and_then(|o| o.source)
                        .map(|ip| ip.to_string())
                        .unwrap_or_default(),
                ),
            ),
            ("userAgent", Value::str("")),
            ("callCount", Value::Long(0)),
        ],
    )
}

async fn login(state: &ApiState, source: IpAddr, body: &Element) -> Result<Reply, Fault> {
    let user = body
        .text_of("userName")
        .filter(|u| !u.is_empty())
        .ok_or_else(|| Fault::invalid_argument("userName", "Login needs a userName"))?
        .to_owned();
    // The password is taken as sent: spaces may be part of it.
    let password = body.child("password").map(|p| p.text.clone()).unwrap_or_default();
    let token = state
        .login_into(&state.soap.sessions, user.clone(), password, source, "SOAP")
        .await
        .map_err(|e| match e.kind {
            ErrorKind::Unauthenticated => Fault::invalid_login(format!(
                "Cannot complete login due to an incorrect user name or password ({})",
                e.message
            )),
            _ => Fault::from_api(&e),
        })?;
    let key = format!("52{:030x}", state.soap.next());
    let session = state
        .soap
        .sessions
        .touch(&token, Now::current())
        .ok_or_else(|| Fault::invalid_login("the new session ended at once; log in again"))?;
    let objects = SessionObjects {
        key,
        source: Some(source),
        ..SessionObjects::default()
    };
    let mut out = String::new();
    user_session(&session, Some(&objects)).write(&mut out, "returnval");
    {
        let mut all = state.soap.objects();
        // Sessions that ended (idle, or pushed out) leave their views and filters behind:
        // swept at each login, so the map holds live sessions only.
        let now = Now::current();
        all.retain(|token, _| state.soap.sessions.is_live(token, now));
        all.insert(token.clone(), objects);
    }
    tracing::info!(user = ?user, %source, "SOAP session started");
    Ok(Reply {
        body: out,
        cookie: Some(token),
        user: Some(user),
    })
}

fn snapshot(state: &ApiState, ctx: &Ctx) -> Result<Snapshot, Fault> {
    let mut extra = {
        let all = state.soap.objects();
        let mine = all.get(&ctx.token);
        Extra {
            views: mine.map(|o| o.views.clone()).unwrap_or_default(),
            tasks: state.soap.tasks.all(),
            session: Some(user_session(&ctx.session, mine)),
            instance_uuid: state.soap.instance_uuid.clone(),
        }
    };
    let domain = &state.domain;
    let d = domain.inventory.domain().map_err(api)?;
    // Every migration is a Task, as REST's /api/cis/tasks answers each of them.
    let datacenter = MoRef::new("Datacenter", &d.datacenter.id);
    for m in domain.inventory.list_migrations().map_err(api)? {
        let moved = if m.state == "RUNNING" {
            domain.live.progress(&m.id)
        } else {
            None
        };
        extra
            .tasks
            .push(TaskRecord::from_migration(&m, moved, (&datacenter, &d.datacenter.name)));
    }
    let vms = domain.inventory.list_vms().map_err(api)?;
    let networks = domain.inventory.networks().map_err(api)?;
    let mut space = HashMap::new();
    for ds in &d.datastores {
        // A datastore whose size cannot be read shows 0, as REST's list would fail: a
        // property read should not fail for one datastore's statvfs.
        let size = crate::api::vcenter::datastore_space(domain, ds).unwrap_or((0, 0));
        space.insert(ds.id.clone(), size);
    }
    Ok(Snapshot::new(d, vms, networks, space, extra))
}

fn with_session<T>(state: &ApiState, ctx: &Ctx, op: impl FnOnce(&mut SessionObjects) -> T) -> T {
    let mut all = state.soap.objects();
    op(all.entry(ctx.token.clone()).or_default())
}

fn returnval_ref(r: Option<MoRef>) -> String {
    let mut out = String::new();
    if let Some(r) = r {
        Value::Ref(r).write(&mut out, "returnval");
    }
    out
}

fn specs(body: &Element) -> Result<Vec<FilterSpec>, Fault> {
    let specs: Vec<FilterSpec> = body
        .all("specSet")
        .map(collector::parse_filter_spec)
        .collect::<Result<_, _>>()?;
    if specs.is_empty() {
        return Err(Fault::invalid_argument(
            "specSet",
            "give at least one PropertyFilterSpec in specSet",
        ));
    }
    Ok(specs)
}

/// The objects and paths of several specs, an object met twice answered once with the
/// union of its paths.
fn plan_all(snap: &Snapshot, specs: &[FilterSpec]) -> Result<Vec<(MoRef, Vec<String>)>, Fault> {
    let mut out: Vec<(MoRef, Vec<String>)> = Vec::new();
    let mut at: HashMap<MoRef, usize> = HashMap::new();
    for spec in specs {
        for (obj, paths) in collector::plan(snap, spec)? {
            match at.get(&obj) {
                Some(&i) => {
                    for p in paths {
                        if !out[i].1.contains(&p) {
                            out[i].1.push(p);
                        }
                    }
                }
                None => {
                    at.insert(obj.clone(), out.len());
                    out.push((obj, paths));
                }
            }
        }
    }
    Ok(out)
}

fn page(
    snap: &Snapshot,
    items: impl IntoIterator<Item = (MoRef, Vec<String>)>,
) -> Result<Vec<collector::ObjectContent>, Fault> {
    let mut out = Vec::new();
    for (obj, paths) in items {
        // An object deleted between pages is left out of the later page.
        if snap.kind_of(&obj.value).is_none() {
            continue;
        }
        out.push(collector::contents(snap, &obj, &paths)?);
    }
    Ok(out)
}

fn retrieve_result(state: &ApiState, ctx: &Ctx, snap: &Snapshot, mut retrieval: Retrieval) -> Result<String, Fault> {
    let n = retrieval.page.min(retrieval.rest.len());
    let first: Vec<_> = retrieval.rest.drain(..n).collect();
    let objects = page(snap, first)?;
    let token = if retrieval.rest.is_empty() {
        None
    } else {
        let token = format!("retrieval-{}", retrieval.seq);
        with_session(state, ctx, |s| {
            if s.retrievals.len() >= MAX_RETRIEVALS {
                // The oldest unfinished retrieval makes room: a client that never reads
                // its last pages cannot fill the session.
                if let Some(oldest) = s.retrievals.iter().min_by_key(|(_, r)| r.seq).map(|(k, _)| k.clone()) {
                    s.retrievals.remove(&oldest);
                }
            }
            s.retrievals.insert(token.clone(), retrieval);
        });
        Some(token)
    };
    if objects.is_empty() && token.is_none() {
        return Ok(String::new());
    }
    let mut out = String::from("<returnval xsi:type=\"RetrieveResult\">");
    if let Some(token) = token {
        Value::Str(token).write(&mut out, "token");
    }
    collector::write_contents(&mut out, "objects", &objects);
    out.push_str("</returnval>");
    Ok(out)
}

fn sync_call(state: &ApiState, ctx: &Ctx, this: &MoRef, call: &Call) -> Result<String, Fault> {
    let body = &call.body;
    match call.method.as_str() {
        // pyvmomi reads `vm.name` and every other property through this hidden method.
        "Fetch" => {
            let snap = snapshot(state, ctx)?;
            let obj = snap.resolve(this)?;
            let prop = body
                .text_of("prop")
                .ok_or_else(|| Fault::invalid_argument("prop", "Fetch needs a prop"))?;
            let mut out = String::new();
            if let Some(value) = snap.get(&obj, prop)? {
                value.write(&mut out, "returnval");
            }
            Ok(out)
        }
        "RetrieveProperties" => {
            let specs = specs(body)?;
            let snap = snapshot(state, ctx)?;
            let objects = page(&snap, plan_all(&snap, &specs)?)?;
            let mut out = String::new();
            collector::write_contents(&mut out, "returnval", &objects);
            Ok(out)
        }
        "RetrievePropertiesEx" => {
            let specs = specs(body)?;
            let max = body
                .child("options")
                .and_then(|o| o.text_of("maxObjects"))
                .map(|m| {
                    m.parse::<i64>()
                        .map_err(|_| Fault::invalid_argument("maxObjects", format!("maxObjects {m:?} is not a number")))
                })
                .transpose()?;
            let page_size = match max {
                Some(n) if n > 0 => (n as usize).min(MAX_PAGE),
                _ => MAX_PAGE,
            };
            let snap = snapshot(state, ctx)?;
            let plan = plan_all(&snap, &specs)?;
            let seq = state.soap.next();
            retrieve_result(
                state,
                ctx,
                &snap,
                Retrieval {
                    rest: plan.into(),
                    page: page_size,
                    seq,
                },
            )
        }
        "ContinueRetrievePropertiesEx" => {
            let token = body.text_of("token").unwrap_or_default().to_owned();
            let retrieval = with_session(state, ctx, |s| s.retrievals.remove(&token)).ok_or_else(|| {
                Fault::invalid_argument(
                    "token",
                    format!("no unfinished retrieval has token {token:?} (it ended, was cancelled or was pushed out); call RetrievePropertiesEx again"),
                )
            })?;
            let snap = snapshot(state, ctx)?;
            retrieve_result(state, ctx, &snap, retrieval)
        }
        "CancelRetrievePropertiesEx" => {
            let token = body.text_of("token").unwrap_or_default().to_owned();
            with_session(state, ctx, |s| s.retrievals.remove(&token));
            Ok(String::new())
        }
        "CreateFilter" => {
            let spec = collector::parse_filter_spec(
                body.child("spec")
                    .ok_or_else(|| Fault::invalid_argument("spec", "CreateFilter needs a spec"))?,
            )?;
            // Checked now, so a bad object or path fails here and not in WaitForUpdates.
            collector::plan(&snapshot(state, ctx)?, &spec)?;
            let id = format!("filter-{}", state.soap.next());
            with_session(state, ctx, |s| {
                if s.filters.len() >= MAX_FILTERS {
                    return Err(Fault::invalid_request(format!(
                        "the session holds {MAX_FILTERS} property filters; destroy some (DestroyPropertyFilter) first"
                    )));
                }
                s.filters.insert(
                    id.clone(),
                    Filter {
                        spec,
                        last: HashMap::new(),
                    },
                );
                Ok(())
            })?;
            Ok(returnval_ref(Some(MoRef::new("PropertyFilter", &id))))
        }
        "DestroyPropertyFilter" => with_session(state, ctx, |s| {
            s.filters
                .remove(&this.value)
                .map(|_| String::new())
                .ok_or_else(|| Fault::not_found(this))
        }),
        "CreateContainerView" => {
            let snap = snapshot(state, ctx)?;
            let container = snap
                .resolve(&moref(body.child("container").ok_or_else(|| {
                    Fault::invalid_argument("container", "CreateContainerView needs a container")
                })?))?;
            let types: Vec<String> = body.all("type").map(|t| t.text.trim().to_owned()).collect();
            if let Some(bad) = types.iter().find(|t| !known_type(t)) {
                return Err(Fault::invalid_argument(
                    "type",
                    format!("{bad:?} is not a managed object type this endpoint answers"),
                ));
            }
            let recursive = body.bool_of("recursive")?.unwrap_or(false);
            let id = format!("view-{}", state.soap.next());
            with_session(state, ctx, |s| {
                if s.views.len() >= MAX_VIEWS {
                    return Err(Fault::invalid_request(format!(
                        "the session holds {MAX_VIEWS} views; destroy some (DestroyView) first"
                    )));
                }
                s.views.insert(
                    id.clone(),
                    View {
                        container,
                        types,
                        recursive,
                    },
                );
                Ok(())
            })?;
            Ok(returnval_ref(Some(MoRef::new("ContainerView", &id))))
        }
        "DestroyView" => with_session(state, ctx, |s| {
            s.views
                .remove(&this.value)
                .map(|_| String::new())
                .ok_or_else(|| Fault::not_found(this))
        }),
        "FindByInventoryPath" => {
            let path = body.text_of("inventoryPath").unwrap_or_default().to_owned();
            let snap = snapshot(state, ctx)?;
            Ok(returnval_ref(snap.find_by_inventory_path(&path)))
        }
        "FindChild" => {
            let snap = snapshot(state, ctx)?;
            let entity = snap
                .resolve(&moref(body.child("entity").ok_or_else(|| {
                    Fault::invalid_argument("entity", "FindChild needs an entity")
                })?))?;
            let name = body.text_of("name").unwrap_or_default();
            Ok(returnval_ref(snap.find_child(&entity, name)))
        }
        "FindByUuid" | "FindAllByUuid" => {
            let method = call.method.as_str();
            let uuid = body
                .text_of("uuid")
                .ok_or_else(|| Fault::invalid_argument("uuid", format!("{method} needs a uuid")))?
                .trim()
                .to_owned();
            // vmSearch is required in vim25; a client that leaves it out searches hosts,
            // as its false would.
            let vm_search = body.bool_of("vmSearch")?.unwrap_or(false);
            // instanceUuid applies to a VM search only (vim25's documentation); a host
            // search ignores it, as vCenter and govmomi's simulator do.
            let instance = body.bool_of("instanceUuid")?.unwrap_or(false);
            let snap = snapshot(state, ctx)?;
            // One datacenter holds the whole domain: naming it narrows nothing, but it
            // must exist.
            if let Some(dc) = body.child("datacenter") {
                snap.resolve(&MoRef {
                    kind: "Datacenter".into(),
                    ..moref(dc)
                })?;
            }
            let found = snap.find_all_by_uuid(&uuid, vm_search, instance);
            if method == "FindByUuid" {
                return Ok(returnval_ref(found.into_iter().next()));
            }
            // An array answer is its returnval repeated, one a reference.
            let mut out = String::new();
            Value::refs(found).write_field(&mut out, "returnval");
            Ok(out)
        }
        other => Err(Fault::not_supported(other)),
    }
}

async fn power_task(state: &ApiState, ctx: &Ctx, this: &MoRef, method: &str) -> Result<String, Fault> {
    let (action, privilege, description) = match method {
        "PowerOnVM_Task" => (
            Action::Start,
            "VirtualMachine.Interact.PowerOn",
            "VirtualMachine.powerOn",
        ),
        "PowerOffVM_Task" => (
            Action::Stop,
            "VirtualMachine.Interact.PowerOff",
            "VirtualMachine.powerOff",
        ),
        _ => (Action::Reset, "VirtualMachine.Interact.Reset", "VirtualMachine.reset"),
    };
    if !(this.kind.is_empty() || this.kind == "VirtualMachine") {
        return Err(Fault::not_found(this));
    }
    let domain = state.domain.clone();
    let id = this.value.clone();
    let vm = blocking(move || domain.inventory.vm(&id).map_err(api))
        .await?
        .ok_or_else(|| Fault::not_found(this))?;
    let principal = ctx.session.principal.clone();
    let target = MoRef::new("VirtualMachine", &vm.id);
    power::may_operate(&principal, "operate VMs").map_err(|e| Fault::no_permission(&target, privilege, e.message))?;
    let task = state
        .soap
        .tasks
        .start(description, target.clone(), vm.name.clone(), &principal.user);
    let (domain, soap, task_id) = (state.domain.clone(), state.soap.clone(), task.clone());
    tokio::spawn(async move {
        let result = power::change(&domain, &principal, &vm.id, action).await;
        soap.tasks.finish(&task_id, result.map_err(|e| Fault::from_api(&e)));
    });
    Ok(returnval_ref(Some(MoRef::new("Task", &task))))
}

async fn wait_for_updates(state: &ApiState, ctx: &Ctx, body: &Element, method: &str) -> Result<String, Fault> {
    let version = body.text_of("version").unwrap_or_default().to_owned();
    let max_wait = match method {
        "CheckForUpdates" => Some(0),
        "WaitForUpdatesEx" => body
            .child("options")
            .and_then(|o| o.text_of("maxWaitSeconds"))
            .map(|s| s.parse::<u64>().unwrap_or(0)),
        _ => None,
    };
    let deadline = Instant::now() + max_wait.map_or(MAX_WAIT, |s| Duration::from_secs(s).min(MAX_WAIT));
    let mut reset = version.is_empty();
    loop {
        let (st, c) = (state.clone(), ctx.clone());
        if let Some(found) = blocking(move || updates(&st, &c, reset)).await? {
            return Ok(found);
        }
        reset = false;
        let now = Instant::now();
        if now >= deadline {
            // WaitForUpdates must answer an UpdateSet; the Ex form answers nothing.
            if method == "WaitForUpdates" {
                let v = with_session(state, ctx, |s| s.update_version);
                let mut out = String::new();
                Value::Data("UpdateSet", vec![("version", Value::Str(v.to_string()))]).write(&mut out, "returnval");
                return Ok(out);
            }
            return Ok(String::new());
        }
        tokio::time::sleep((deadline - now).min(Duration::from_millis(200))).await;
    }
}

fn serialized(v: &Value) -> String {
    let mut s = String::new();
    v.write(&mut s, "v");
    s
}

/// The changes of every filter of the session since it last reported; `None` if none.
fn updates(state: &ApiState, ctx: &Ctx, reset: bool) -> Result<Option<String>, Fault> {
    let snap = snapshot(state, ctx)?;
    let mut all = state.soap.objects();
    let s = all.entry(ctx.token.clone()).or_default();
    let mut ids: Vec<String> = s.filters.keys().cloned().collect();
    ids.sort();
    let mut filter_updates = Vec::new();
    for id in ids {
        let Some(f) = s.filters.get_mut(&id) else { continue };
        if reset {
            f.last.clear();
        }
        // A filter whose object is gone (a forgotten task) reports it leaving.
        let plan = collector::plan(&snap, &f.spec).unwrap_or_default();
        let mut now_map = HashMap::new();
        let mut object_updates = Vec::new();
        for (obj, paths) in plan {
            let content = collector::contents(&snap, &obj, &paths)?;
            let current: HashMap<String, String> =
                content.props.iter().map(|(p, v)| (p.clone(), serialized(v))).collect();
            let before = f.last.get(&obj);
            let mut changes = Vec::new();
            for (path, value) in &content.props {
                if before.and_then(|b| b.get(path)) != current.get(path) {
                    changes.push(Value::Data(
                        "PropertyChange",
                        vec![
                            ("name", Value::Str(path.clone())),
                            ("op", Value::Enum("PropertyChangeOp", "assign".into())),
                            ("val", Value::Any(Box::new(value.clone()))),
                        ],
                    ));
                }
            }
            if let Some(before) = before {
                for path in before.keys().filter(|p| !current.contains_key(*p)) {
                    changes.push(Value::Data(
                        "PropertyChange",
                        vec![
                            ("name", Value::Str(path.clone())),
                            ("op", Value::Enum("PropertyChangeOp", "remove".into())),
                        ],
                    ));
                }
            }
            if before.is_none() || !changes.is_empty() {
                let kind = if before.is_none() { "enter" } else { "modify" };
                object_updates.push(Value::Data(
                    "ObjectUpdate",
                    vec![
                        ("kind", Value::Enum("ObjectUpdateKind", kind.into())),
                        ("obj", Value::Ref(obj.clone())),
                        ("changeSet", Value::Array("PropertyChange", changes)),
                    ],
                ));
            }
            now_map.insert(obj, current);
        }
        for gone in f.last.keys().filter(|o| !now_map.contains_key(*o)) {
            object_updates.push(Value::Data(
                "ObjectUpdate",
                vec![
                    ("kind", Value::Enum("ObjectUpdateKind", "leave".into())),
                    ("obj", Value::Ref(gone.clone())),
                ],
            ));
        }
        f.last = now_map;
        if !object_updates.is_empty() {
            filter_updates.push(Value::Data(
                "PropertyFilterUpdate",
                vec![
                    ("filter", Value::Ref(MoRef::new("PropertyFilter", &id))),
                    ("objectSet", Value::Array("ObjectUpdate", object_updates)),
                ],
            ));
        }
    }
    if filter_updates.is_empty() {
        return Ok(None);
    }
    s.update_version += 1;
    let mut out = String::new();
    Value::Data(
        "UpdateSet",
        vec![
            ("version", Value::Str(s.update_version.to_string())),
            ("filterSet", Value::Array("PropertyFilterUpdate", filter_updates)),
        ],
    )
    .write(&mut out, "returnval");
    Ok(Some(out))
}
