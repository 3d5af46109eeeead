//! The shared store: one PostgreSQL database that every endpoint of a scale-out domain
//! uses, through a bounded pool of connections.
//!
//! The inventory's methods are blocking (callers run them on `spawn_blocking` threads),
//! and tokio refuses a nested `block_on` there. So the connections' I/O runs on a small
//! runtime of the store's own, and a method waits for a statement with
//! `futures_executor::block_on`, which only waits for the answer to come back on a
//! channel and works on any thread.

use std::collections::HashMap;
use std::sync::{Condvar, Mutex};
use std::time::Duration;

use futures_executor::block_on;
use tokio_postgres::types::{IsNull, ToSql, Type};

use tokio_postgres::{Client, IsolationLevel, NoTls, Statement};

use super::{postgres_placeholders, Access, Dialect, Row, StoreError, Tx, TxError, Value};

/// Connections one endpoint opens at most. Each inventory call holds one for its
/// transaction only; 8 per endpoint keeps three endpoints far below PostgreSQL's default
/// `max_connections` (100).
const MAX_CONNECTIONS: usize = 8;

/// Times a transaction that lost a race to another endpoint's runs, at most. Each waits
/// a random while first, longer after each loss, so that the contenders spread out.
const RETRIES: usize = 30;

struct Conn {
    client: Client,
    /// Prepared statements by their SQL: a statement is parsed once per connection.
    statements: HashMap<String, Statement>,
}

#[derive(Default)]
struct Pool {
    idle: Vec<Conn>,
    open: usize,
}

pub struct PgStore {
    /// The URL without its password, for messages.
    shown: String,
    config: tokio_postgres::Config,
    runtime: Option<tokio::runtime::Runtime>,
    pool: Mutex<Pool>,
    freed: Condvar,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore")
            .field("url", &self.shown)
            .finish_non_exhaustive()
    }
}

/// The URL without its password.
impl std::fmt::Display for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.shown)
    }
}

impl Drop for PgStore {
    fn drop(&mut self) {
        // Not a blocking shutdown: the store may be dropped on an async task.
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// `postgres://user:secret@host/db` as `postgres://user:***@host/db`.
fn without_password(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let credentials = &url[scheme + 3..at];
            match credentials.find(':') {
                Some(colon) => format!("{}{}:***{}", &url[..scheme + 3], &credentials[..colon], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

impl PgStore {
    /// Connects to the database at `url` (`postgres://user:password@host:port/db`, or
    /// libpq's `host=... dbname=...`); one connection is opened at once so that a wrong
    /// URL is reported at start-up, not at the first migration.
    pub fn connect(url: &str) -> Result<PgStore, StoreError> {
        let shown = without_password(url);
        let config: tokio_postgres::Config = url.parse().map_err(|e: tokio_postgres::Error| StoreError::Connect {
            url: shown.clone(),
            reason: e.to_string(),
        })?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("inventory-pg")
            .enable_all()
            .build()
            .map_err(|e| StoreError::Connect {
                url: shown.clone(),
                reason: format!("cannot start the connection runtime: {e}"),
            })?;
        let store = PgStore {
            shown,
            config,
            runtime: Some(runtime),
            pool: Mutex::new(Pool::default()),
            freed: Condvar::new(),
        };
        let first = store.open_conn()?;
        store.lock().open += 1;
        store.give_back(first);
        Ok(store)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Pool> {
        self.pool.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn open_conn(&self) -> Result<Conn, StoreError> {
        let runtime = self.runtime.as_ref().expect("the runtime lives as long as the store");
        let config = self.config.clone();
        let connecting = runtime.spawn(async move {
            let (client, connection) = config.connect(NoTls).await?;
            // The connection's socket is driven here for as long as the client lives.
            tokio::spawn(async move {
                if let Err(e) = connection.await {
                    tracing::warn!(error = %e, "inventory database connection ended");
                }
            });
            Ok::<_, tokio_postgres::Error>(client)
        });
        let client = block_on(connecting)
            .map_err(|e| StoreError::Connect {
                url: self.shown.clone(),
                reason: e.to_string(),
            })?
            .map_err(|e| StoreError::Connect {
                url: self.shown.clone(),
                reason: e.to_string(),
            })?;
        Ok(Conn {
            client,
            statements: HashMap::new(),
        })
    }

    /// An idle connection, a new one while fewer than [`MAX_CONNECTIONS`] are open, or
    /// the first one given back.
    fn take(&self) -> Result<Conn, StoreError> {
        let mut pool = self.lock();
        loop {
            while let Some(conn) = pool.idle.pop() {
                if !conn.client.is_closed() {
                    return Ok(conn);
                }
                pool.open -= 1;
            }
            if pool.open < MAX_CONNECTIONS {
                pool.open += 1;
                drop(pool);
                return self.open_conn().inspect_err(|_| {
                    self.lock().open -= 1;
                    self.freed.notify_one();
                });
            }
            pool = self.freed.wait(pool).unwrap_or_else(|poisoned| poisoned.into_inner());
        }
    }

    fn give_back(&self, conn: Conn) {
        let mut pool = self.lock();
        if conn.client.is_closed() {
            pool.open -= 1;
        } else {
            pool.idle.push(conn);
        }
        self.freed.notify_one();
    }

    pub(super) fn transaction<T, E: TxError>(
        &self,
        access: Access,
        f: &mut dyn FnMut(&mut dyn Tx) -> Result<T, E>,
    ) -> Result<T, E> {
        let mut conn = self.take()?;
        let mut attempt = 0;
        let out = loop {
            attempt += 1;
            let result = run_once(&mut conn, access, f);
            match result {
                Err(e) if attempt < RETRIES && e.store_error().is_some_and(StoreError::is_retryable) => {
                    let wait = backoff(attempt);
                    tracing::debug!(
                        attempt,
                        wait_ms = wait.as_millis() as u64,
                        "inventory transaction met another endpoint's; running it again"
                    );
                    std::thread::sleep(wait);
                    continue;
                }
                other => break other,
            }
        };
        self.give_back(conn);
        out
    }
}

/// How long a transaction that lost its `attempt`-th race waits before it runs again: a
/// random while in the upper half of 2 ms doubled per loss, at most 200 ms. Without it
/// the losers of a race run again at once and meet again (a burst of edges starting
/// together lost 1 pair in a few hundred to 30 straight losses in the scale-out
/// benchmark).
fn backoff(attempt: usize) -> Duration {
    let ceiling = 2u64.saturating_mul(1 << attempt.min(16)).min(200);
    Duration::from_millis(rand::random_range(ceiling / 2..=ceiling))
}

fn run_once<T, E: TxError>(
    conn: &mut Conn,
    access: Access,
    f: &mut dyn FnMut(&mut dyn Tx) -> Result<T, E>,
) -> Result<T, E> {
    let Conn { client, statements } = conn;
    let start = client
        .build_transaction()
        .isolation_level(match access {
            // One snapshot for every query of a read.
            Access::Read => IsolationLevel::RepeatableRead,
            Access::Write => IsolationLevel::Serializable,
            Access::PerStatement => IsolationLevel::ReadCommitted,
        })
        .read_only(access == Access::Read)
        .start();
    let tx = block_on(start).map_err(StoreError::from)?;
    let mut handle = PgTx { tx, statements };
    let out = f(&mut handle)?;
    // Dropping an uncommitted transaction rolls it back.
    block_on(handle.tx.commit()).map_err(StoreError::from)?;
    Ok(out)
}

struct PgTx<'c> {
    tx: tokio_postgres::Transaction<'c>,
    statements: &'c mut HashMap<String, Statement>,
}

impl PgTx<'_> {
    fn prepare(&mut self, sql: &str) -> Result<Statement, StoreError> {
        if let Some(statement) = self.statements.get(sql) {
            return Ok(statement.clone());
        }
        let statement = block_on(self.tx.prepare(&postgres_placeholders(sql)))?;
        self.statements.insert(sql.to_owned(), statement.clone());
        Ok(statement)
    }
}

impl ToSql for Value {
    fn to_sql(&self, ty: &Type, out: &mut bytes::BytesMut) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        match self {
            Value::Null => Ok(IsNull::Yes),
            Value::Integer(v) => match *ty {
                Type::INT8 => v.to_sql(ty, out),
                Type::INT4 => i32::try_from(*v)?.to_sql(ty, out),
                Type::INT2 => i16::try_from(*v)?.to_sql(ty, out),
                Type::BOOL => (*v != 0).to_sql(ty, out),
                Type::FLOAT8 => (*v as f64).to_sql(ty, out),
                _ => Err(format!("an integer cannot be stored as {ty}").into()),
            },
            Value::Real(v) => match *ty {
                Type::FLOAT8 => v.to_sql(ty, out),
                Type::FLOAT4 => (*v as f32).to_sql(ty, out),
                _ => Err(format!("a real number cannot be stored as {ty}").into()),
            },
            Value::Text(v) => v.as_str().to_sql(ty, out),
            Value::Blob(v) => v.as_slice().to_sql(ty, out),
        }
    }

    fn accepts(_: &Type) -> bool {
        // Checked per value in `to_sql`, which knows which variant it holds.
        true
    }

    tokio_postgres::types::to_sql_checked!();
}

fn row_of(row: &tokio_postgres::Row) -> Result<Row, StoreError> {
    let mut values = Vec::with_capacity(row.len());
    for (i, column) in row.columns().iter().enumerate() {
        let value = match *column.type_() {
            Type::INT8 => row.try_get::<_, Option<i64>>(i)?.map(Value::Integer),
            Type::INT4 => row.try_get::<_, Option<i32>>(i)?.map(|v| Value::Integer(v.into())),
            Type::INT2 => row.try_get::<_, Option<i16>>(i)?.map(|v| Value::Integer(v.into())),
            Type::BOOL => row.try_get::<_, Option<bool>>(i)?.map(|v| Value::Integer(v.into())),
            Type::FLOAT8 => row.try_get::<_, Option<f64>>(i)?.map(Value::Real),
            Type::FLOAT4 => row.try_get::<_, Option<f32>>(i)?.map(|v| Value::Real(v.into())),
            Type::BYTEA => row.try_get::<_, Option<Vec<u8>>>(i)?.map(Value::Blob),
            // What a function called for its effect returns (`pg_advisory_xact_lock`).
            Type::VOID => None,
            // TEXT, VARCHAR, NAME and the rest that read as text; anything else (NUMERIC
            // from a SUM, say) fails here: the query must CAST it.
            _ => row.try_get::<_, Option<String>>(i)?.map(Value::Text),
        };
        values.push(value.unwrap_or(Value::Null));
    }
    Ok(Row(values))
}

fn refs(params: &[Value]) -> Vec<&(dyn ToSql + Sync)> {
    params.iter().map(|p| p as &(dyn ToSql + Sync)).collect()
}

impl Tx for PgTx<'_> {
    fn dialect(&self) -> Dialect {
        Dialect::Postgres
    }

    fn execute(&mut self, sql: &str, params: &[Value]) -> Result<u64, StoreError> {
        let statement = self.prepare(sql)?;
        Ok(block_on(self.tx.execute(&statement, &refs(params)))?)
    }

    fn query(&mut self, sql: &str, params: &[Value]) -> Result<Vec<Row>, StoreError> {
        let statement = self.prepare(sql)?;
        let rows = block_on(self.tx.query(&statement, &refs(params)))?;
        rows.iter().map(row_of).collect()
    }

    fn batch(&mut self, sql: &str) -> Result<(), StoreError> {
        Ok(block_on(self.tx.batch_execute(sql))?)
    }
}
