//! An async QMP client: QEMU's JSON control protocol over its unix socket.
//!
//! One task owns the socket's read half and routes what arrives: replies (matched to
//! their command by the `id` we sent) to the waiting caller, events to a broadcast
//! channel. Commands are written under a lock, so any number of tasks may issue them at
//! once through clones of one [`Qmp`].
//!
//! Framing: QEMU writes one JSON object per line (`\r\n`). [`read_frame`] finds a line
//! with a length cap before it grows a buffer; [`parse_message`] is a pure function over
//! one line, so it is tested without sockets.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::OwnedWriteHalf;
use tokio::net::UnixStream;
use tokio::sync::{broadcast, oneshot, watch};

use super::QemuError;

/// A QMP line longer than this is refused. `query-qmp-schema`, the largest reply QEMU
/// gives, is a few hundred KiB.
pub const MAX_MESSAGE_BYTES: usize = 8 << 20;

/// How long the greeting and capability negotiation may take after connecting.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Events queued per subscriber before a slow one starts missing them.
const EVENT_QUEUE: usize = 256;

/// An asynchronous QEMU event (`SHUTDOWN`, `STOP`, `RESUME`, `MIGRATION`, ...).
#[derive(Debug, Clone, PartialEq)]
pub struct QmpEvent {
    pub name: String,
    /// `data`, or `null` when the event has none.
    pub data: Value,
}

/// One message from QEMU.
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    /// `{"QMP":{"version":...,"capabilities":[...]}}`, the first line on a connection.
    Greeting(Value),
    /// `{"return":...,"id":...}`.
    Return {
        id: Option<Value>,
        value: Value,
    },
    /// `{"error":{"class","desc"},"id":...}`.
    Error {
        id: Option<Value>,
        class: String,
        desc: String,
    },
    Event(QmpEvent),
}

/// Parses one line from QEMU. Anything but a JSON object of the four known shapes is
/// malformed.
pub fn parse_message(line: &[u8]) -> Result<Message, QemuError> {
    let value: Value = serde_json::from_slice(line).map_err(|e| QemuError::QmpMalformed(format!("not JSON ({e})")))?;
    let Value::Object(mut obj) = value else {
        return Err(QemuError::QmpMalformed("not a JSON object".into()));
    };
    let id = obj.remove("id");
    if let Some(greeting) = obj.remove("QMP") {
        return Ok(Message::Greeting(greeting));
    }
    if let Some(value) = obj.remove("return") {
        return Ok(Message::Return { id, value });
    }
    if let Some(error) = obj.remove("error") {
        let field = |name: &str| error.get(name).and_then(Value::as_str).map(str::to_owned);
        let (Some(class), Some(desc)) = (field("class"), field("desc")) else {
            return Err(QemuError::QmpMalformed(format!(
                "an error without class and desc: {error}"
            )));
        };
        return Ok(Message::Error { id, class, desc });
    }
    if let Some(name) = obj.remove("event") {
        let Value::String(name) = name else {
            return Err(QemuError::QmpMalformed(format!(
                "an event name that is not a string: {name}"
            )));
        };
        let data = obj.remove("data").unwrap_or(Value::Null);
        return Ok(Message::Event(QmpEvent { name, data }));
    }
    let keys: Vec<&String> = obj.keys().collect();
    Err(QemuError::QmpMalformed(format!(
        "an object with none of QMP, return, error, event (keys {keys:?})"
    )))
}

/// Reads one line (without its `\n`; a trailing `\r` stays, JSON ignores it) into `buf`.
/// `Ok(false)` at the end of the stream. A line over `max` bytes is an error, found
/// before the buffer grows past it.
pub async fn read_frame<R: AsyncBufRead + Unpin>(r: &mut R, buf: &mut Vec<u8>, max: usize) -> Result<bool, QemuError> {
    buf.clear();
    loop {
        let available = r.fill_buf().await.map_err(QemuError::QmpIo)?;
        if available.is_empty() {
            // A line cut by the end of the stream is QEMU dying mid-write: the end.
            return Ok(false);
        }
        let (take, done) = match available.iter().position(|&b| b == b'\n') {
            Some(i) => (i, true),
            None => (available.len(), false),
        };
        if buf.len() + take > max {
            return Err(QemuError::QmpTooLong { max });
        }
        buf.extend_from_slice(&available[..take]);
        r.consume(if done { take + 1 } else { take });
        if done {
            return Ok(true);
        }
    }
}

type Reply = Result<Value, (String, String)>;

#[derive(Debug)]
struct Shared {
    writer: tokio::sync::Mutex<OwnedWriteHalf>,
    /// Commands waiting for their reply, by id. `None` once the connection is gone, so a
    /// command issued after that fails at once instead of waiting forever.
    pending: Mutex<Option<HashMap<u64, oneshot::Sender<Reply>>>>,
    next_id: AtomicU64,
    events: broadcast::Sender<QmpEvent>,
    closed: watch::Sender<bool>,
}

impl Shared {
    fn pending(&self) -> std::sync::MutexGuard<'_, Option<HashMap<u64, oneshot::Sender<Reply>>>> {
        // The map holds no invariant a panic could break halfway.
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A QMP connection after capability negotiation. Cheap to clone; the connection lives
/// until QEMU closes it (or exits), whatever the clones do.
#[derive(Debug, Clone)]
pub struct Qmp {
    shared: Arc<Shared>,
    greeting: Arc<Value>,
}

impl Qmp {
    /// Connects to QEMU's QMP socket, reads its greeting and leaves capability
    /// negotiation with `qmp_capabilities`.
    pub async fn connect(socket: &Path) -> Result<Qmp, QemuError> {
        let stream = UnixStream::connect(socket).await.map_err(|source| QemuError::Connect {
            socket: socket.to_owned(),
            source,
        })?;
        tokio::time::timeout(HANDSHAKE_TIMEOUT, Qmp::handshake(stream))
            .await
            .map_err(|_| QemuError::QmpMalformed(format!("no QMP greeting within {} s", HANDSHAKE_TIMEOUT.as_secs())))?
    }

    async fn handshake(stream: UnixStream) -> Result<Qmp, QemuError> {
        let (read, write) = stream.into_split();
        let mut reader = BufReader::new(read);
        let mut line = Vec::new();
        if !read_frame(&mut reader, &mut line, MAX_MESSAGE_BYTES).await? {
            return Err(QemuError::Disconnected);
        }
        let Message::Greeting(greeting) = parse_message(&line)? else {
            return Err(QemuError::QmpMalformed(
                "the first message is not the QMP greeting".into(),
            ));
        };
        let (events, _) = broadcast::channel(EVENT_QUEUE);
        let shared = Arc::new(Shared {
            writer: tokio::sync::Mutex::new(write),
            pending: Mutex::new(Some(HashMap::new())),
            next_id: AtomicU64::new(1),
            events,
            closed: watch::channel(false).0,
        });
        tokio::spawn(read_loop(reader, shared.clone()));
        let qmp = Qmp {
            shared,
            greeting: Arc::new(greeting),
        };
        qmp.execute("qmp_capabilities", Value::Null).await?;
        Ok(qmp)
    }

    /// The greeting's content: `{"version":{"qemu":{"major",...}},"capabilities":[...]}`.
    pub fn greeting(&self) -> &Value {
        &self.greeting
    }

    /// Runs one command and returns its `return` value. `arguments` is an object, or
    /// `null` for none. QEMU's refusal comes back as [`QemuError::Command`] with its class
    /// and description.
    pub async fn execute(&self, command: &str, arguments: Value) -> Result<Value, QemuError> {
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        match self.shared.pending().as_mut() {
            Some(pending) => pending.insert(id, tx),
            None => return Err(QemuError::Disconnected),
        };
        let mut request = json!({ "execute": command, "id": id });
        if !arguments.is_null() {
            request["arguments"] = arguments;
        }
        let mut bytes = serde_json::to_vec(&request).map_err(|e| QemuError::QmpMalformed(e.to_string()))?;
        bytes.push(b'\n');
        let written = {
            let mut writer = self.shared.writer.lock().await;
            writer.write_all(&bytes).await
        };
        if let Err(e) = written {
            if let Some(pending) = self.shared.pending().as_mut() {
                pending.remove(&id);
            }
            return Err(match e.kind() {
                std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset => QemuError::Disconnected,
                _ => QemuError::QmpIo(e),
            });
        }
        match rx.await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err((class, desc))) => Err(QemuError::Command {
                command: command.to_owned(),
                class,
                desc,
            }),
            // The reader dropped the sender: the connection ended before the reply.
            Err(_) => Err(QemuError::Disconnected),
        }
    }

    /// A receiver of every event from now on. Subscribe before issuing the command whose
    /// event you wait for, or it may come first.
    pub fn events(&self) -> broadcast::Receiver<QmpEvent> {
        self.shared.events.subscribe()
    }

    /// Waits on `events` (from [`Qmp::events`]) for an event named `name`, skipping
    /// others, for at most `timeout`. Events that arrived before the connection ended
    /// are still delivered; after them, the end is [`QemuError::Disconnected`].
    pub async fn wait_for_event(
        &self,
        events: &mut broadcast::Receiver<QmpEvent>,
        name: &str,
        timeout: Duration,
    ) -> Result<QmpEvent, QemuError> {
        let wait = async {
            loop {
                tokio::select! {
                    biased;
                    received = events.recv() => match received {
                        Ok(event) if event.name == name => return Ok(event),
                        Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => continue,
                        Err(broadcast::error::RecvError::Closed) => return Err(QemuError::Disconnected),
                    },
                    () = self.closed() => {
                        // Drain what the reader queued before it stopped.
                        while let Ok(event) = events.try_recv() {
                            if event.name == name {
                                return Ok(event);
                            }
                        }
                        return Err(QemuError::Disconnected);
                    }
                }
            }
        };
        tokio::time::timeout(timeout, wait)
            .await
            .map_err(|_| QemuError::EventTimeout {
                event: name.to_owned(),
                millis: timeout.as_millis(),
            })?
    }

    /// Completes when the connection has ended (QEMU closed it or exited).
    pub async fn closed(&self) {
        let mut rx = self.shared.closed.subscribe();
        // The sender lives in `shared`, which `self` keeps alive.
        let _ = rx.wait_for(|closed| *closed).await;
    }

    /// Ends the connection (QEMU keeps running). Its monitor serves one client at a time,
    /// so another one can connect only after this.
    pub async fn close(&self) {
        let _ = self.shared.writer.lock().await.shutdown().await;
        self.closed().await;
    }

    pub fn is_closed(&self) -> bool {
        *self.shared.closed.borrow()
    }
}

async fn read_loop(mut reader: BufReader<tokio::net::unix::OwnedReadHalf>, shared: Arc<Shared>) {
    let mut line = Vec::new();
    loop {
        match read_frame(&mut reader, &mut line, MAX_MESSAGE_BYTES).await {
            Ok(true) => {}
            Ok(false) => break,
            Err(e) => {
                tracing::warn!(error = %e, "QMP connection dropped");
                break;
            }
        }
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let message = match parse_message(&line) {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(error = %e, "QMP connection dropped");
                break;
            }
        };
        let (id, reply) = match message {
            Message::Event(event) => {
                // No subscriber is fine: nobody waits for events now.
                let _ = shared.events.send(event);
                continue;
            }
            Message::Greeting(_) => {
                tracing::warn!("QMP: a second greeting on one connection, ignored");
                continue;
            }
            Message::Return { id, value } => (id, Ok(value)),
            Message::Error { id, class, desc } => (id, Err((class, desc))),
        };
        let Some(id) = id.as_ref().and_then(Value::as_u64) else {
            // Replies without our id answer commands we never send (or QEMU's own
            // parse errors, which it cannot attribute): the caller would hang, so say it.
            tracing::warn!(reply = ?reply, "QMP: a reply without a known id, ignored");
            continue;
        };
        let waiter = shared.pending().as_mut().and_then(|p| p.remove(&id));
        if let Some(waiter) = waiter {
            // The caller may have given up (its future was dropped): nothing to do.
            let _ = waiter.send(reply);
        }
    }
    // Dropping the senders wakes every waiting command with Disconnected.
    shared.pending().take();
    shared.closed.send_replace(true);
}

#[cfg(test)]
#[path = "qmp_tests.rs"]
mod tests;
