//! Where the inventory's rows live: SQLite (the embedded default, one file beside the
//! endpoint) or PostgreSQL (one database that several endpoints share; see
//! `docs/scale-out.md`).
//!
//! The inventory's code is written once over [`Tx`]: SQL whose parameters are `?1`,
//! `?2`, ... and whose values are [`Value`]s, which both engines understand. What the
//! engines disagree on (DDL, `INSERT OR IGNORE`, clocks) is asked of [`Dialect`] rather
//! than hidden behind a query builder: the statements stay readable SQL.

mod postgres;
mod sqlite;
#[cfg(any(test, feature = "test-postgres"))]
pub mod test_pg;
#[cfg(test)]
mod tests;

pub use self::postgres::PgStore;
pub use self::sqlite::SqliteStore;

/// Which SQL an engine speaks where the two differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    Sqlite,
    Postgres,
}

impl Dialect {
    /// An expression for the database's clock in milliseconds since the Unix epoch. The
    /// leases of a scale-out domain are timed by the database's clock, the one clock every
    /// endpoint shares, so an endpoint whose own clock is off never takes a lease early.
    pub fn now_ms(self) -> &'static str {
        match self {
            Dialect::Sqlite => "CAST(unixepoch('subsec') * 1000 AS INTEGER)",
            Dialect::Postgres => "CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000 AS BIGINT)",
        }
    }
}

/// One value of a row or of a statement's parameter. Integers are 64-bit on both
/// engines (PostgreSQL's columns are `BIGINT`), booleans are integers 0 and 1 as SQLite
/// keeps them.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Null,
    Integer(i64),
    Real(f64),
    Text(String),
    Blob(Vec<u8>),
}

impl Value {
    fn kind(&self) -> &'static str {
        match self {
            Value::Null => "NULL",
            Value::Integer(_) => "an integer",
            Value::Real(_) => "a real number",
            Value::Text(_) => "text",
            Value::Blob(_) => "bytes",
        }
    }
}

impl From<i64> for Value {
    fn from(v: i64) -> Self {
        Value::Integer(v)
    }
}

impl From<i32> for Value {
    fn from(v: i32) -> Self {
        Value::Integer(v.into())
    }
}

impl From<u32> for Value {
    fn from(v: u32) -> Self {
        Value::Integer(v.into())
    }
}

/// Sizes and offsets above `i64::MAX` cannot be stored by either engine; they are
/// refused by the statement (as NULL into a NOT NULL column would be) rather than
/// wrapped into negative numbers.
impl From<u64> for Value {
    fn from(v: u64) -> Self {
        i64::try_from(v).map_or(Value::Real(v as f64), Value::Integer)
    }
}

impl From<u16> for Value {
    fn from(v: u16) -> Self {
        Value::Integer(v.into())
    }
}

impl From<usize> for Value {
    fn from(v: usize) -> Self {
        Value::from(v as u64)
    }
}

impl From<bool> for Value {
    fn from(v: bool) -> Self {
        Value::Integer(v.into())
    }
}

impl From<f64> for Value {
    fn from(v: f64) -> Self {
        Value::Real(v)
    }
}

impl From<&str> for Value {
    fn from(v: &str) -> Self {
        Value::Text(v.to_owned())
    }
}

impl From<String> for Value {
    fn from(v: String) -> Self {
        Value::Text(v)
    }
}

impl From<std::borrow::Cow<'_, str>> for Value {
    fn from(v: std::borrow::Cow<'_, str>) -> Self {
        Value::Text(v.into_owned())
    }
}

impl<T: Clone + Into<Value>> From<&T> for Value {
    fn from(v: &T) -> Self {
        v.clone().into()
    }
}

impl From<&[u8]> for Value {
    fn from(v: &[u8]) -> Self {
        Value::Blob(v.to_vec())
    }
}

impl From<Vec<u8>> for Value {
    fn from(v: Vec<u8>) -> Self {
        Value::Blob(v)
    }
}

impl<T: Into<Value>> From<Option<T>> for Value {
    fn from(v: Option<T>) -> Self {
        v.map_or(Value::Null, Into::into)
    }
}

/// The parameters of a statement: `store_params![a, b]` turns each into a [`Value`]. As
/// rusqlite's `params!`, it borrows them (and copies what it borrowed).
#[macro_export]
macro_rules! store_params {
    ($($value:expr),* $(,)?) => {
        &[$($crate::inventory::store::Value::from(&$value)),*][..]
    };
}

/// A row of a query's answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Row(pub(crate) Vec<Value>);

impl Row {
    /// Column `index` as `T`, or an error naming the column and what it held.
    pub fn get<T: FromValue>(&self, index: usize) -> Result<T, StoreError> {
        let value = self.0.get(index).ok_or(StoreError::Column {
            index,
            expected: T::EXPECTED,
            found: "no such column",
        })?;
        T::from_value(value).ok_or(StoreError::Column {
            index,
            expected: T::EXPECTED,
            found: value.kind(),
        })
    }
}

/// A Rust type a column can be read as.
pub trait FromValue: Sized {
    const EXPECTED: &'static str;
    fn from_value(value: &Value) -> Option<Self>;
}

impl FromValue for i64 {
    const EXPECTED: &'static str = "an integer";
    fn from_value(value: &Value) -> Option<Self> {
        match value {
            Value::Integer(v) => Some(*v),
            _ => None,
        }
    }
}

impl FromValue for u64 {
    const EXPECTED: &'static str = "a non-negative integer";
    fn from_value(value: &Value) -> Option<Self> {
        i64::from_value(value).and_then(|v| u64::try_from(v).ok())
    }
}

impl FromValue for u32 {
    const EXPECTED: &'static str = "a non-negative 32-bit integer";
    fn from_value(value: &Value) -> Option<Self> {
        i64::from_value(value).and_then(|v| u32::try_from(v).ok())
    }
}

impl FromValue for i32 {
    const EXPECTED: &'static str = "a 32-bit integer";
    fn from_value(value: &Value) -> Option<Self> {
        i64::from_value(value).and_then(|v| i32::try_from(v).ok())
    }
}

impl FromValue for u16 {
    const EXPECTED: &'static str = "a non-negative 16-bit integer";
    fn from_value(value: &Value) -> Option<Self> {
        i64::from_value(value).and_then(|v| u16::try_from(v).ok())
    }
}

impl FromValue for usize {
    const EXPECTED: &'static str = "a non-negative integer";
    fn from_value(value: &Value) -> Option<Self> {
        i64::from_value(value).and_then(|v| usize::try_from(v).ok())
    }
}

impl FromValue for bool {
    const EXPECTED: &'static str = "0 or 1";
    fn from_value(value: &Value) -> Option<Self> {
        match value {
            Value::Integer(0) => Some(false),
            Value::Integer(1) => Some(true),
            _ => None,
        }
    }
}

impl FromValue for f64 {
    const EXPECTED: &'static str = "a number";
    fn from_value(value: &Value) -> Option<Self> {
        match value {
            Value::Real(v) => Some(*v),
            Value::Integer(v) => Some(*v as f64),
            _ => None,
        }
    }
}

impl FromValue for String {
    const EXPECTED: &'static str = "text";
    fn from_value(value: &Value) -> Option<Self> {
        match value {
            Value::Text(v) => Some(v.clone()),
            _ => None,
        }
    }
}

impl FromValue for Vec<u8> {
    const EXPECTED: &'static str = "bytes";
    fn from_value(value: &Value) -> Option<Self> {
        match value {
            Value::Blob(v) => Some(v.clone()),
            _ => None,
        }
    }
}

impl<T: FromValue> FromValue for Option<T> {
    const EXPECTED: &'static str = T::EXPECTED;
    fn from_value(value: &Value) -> Option<Self> {
        match value {
            Value::Null => Some(None),
            other => T::from_value(other).map(Some),
        }
    }
}

/// What can go wrong below the inventory: the engine's own error, or a column that does
/// not hold what the code reads it as (a database written by something else).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    #[error(transparent)]
    Sqlite(#[from] rusqlite::Error),

    #[error("PostgreSQL: {}", postgres_message(.0))]
    Postgres(#[source] Box<tokio_postgres::Error>),

    #[error("cannot reach PostgreSQL at {url}: {reason}; check the database URL, that the server runs and that this endpoint may log in")]
    Connect { url: String, reason: String },

    #[error("a query that must find a row found none")]
    NoRows,

    #[error("column {index} holds {found}, not {expected}; the database was not written by this cloud-endpoint")]
    Column {
        index: usize,
        expected: &'static str,
        found: &'static str,
    },
}

/// The server's own words for an error it reported (tokio-postgres's `Display` says only
/// "db error"), else the driver's.
fn postgres_message(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => {
            let mut message = format!("{} ({}): {}", db.severity(), db.code().code(), db.message());
            if let Some(detail) = db.detail() {
                message.push_str(&format!(" ({detail})"));
            }
            message
        }
        None => e.to_string(),
    }
}

impl From<tokio_postgres::Error> for StoreError {
    fn from(e: tokio_postgres::Error) -> Self {
        StoreError::Postgres(Box::new(e))
    }
}

impl StoreError {
    /// A UNIQUE or PRIMARY KEY constraint refused the row: e.g. a VM name that another
    /// endpoint of the domain reserved a moment earlier.
    pub fn is_unique_violation(&self) -> bool {
        match self {
            StoreError::Sqlite(rusqlite::Error::SqliteFailure(e, _)) => {
                e.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE
                    || e.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_PRIMARYKEY
            }
            StoreError::Postgres(e) => e.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION),
            _ => false,
        }
    }

    /// Two transactions met and the database chose this one to give way (PostgreSQL's
    /// serialization failure or deadlock, SQLite's busy): running it again is the remedy.
    pub fn is_retryable(&self) -> bool {
        match self {
            StoreError::Sqlite(rusqlite::Error::SqliteFailure(e, _)) => {
                e.code == rusqlite::ErrorCode::DatabaseBusy || e.code == rusqlite::ErrorCode::DatabaseLocked
            }
            StoreError::Postgres(e) => matches!(
                e.code(),
                Some(c) if *c == tokio_postgres::error::SqlState::T_R_SERIALIZATION_FAILURE
                    || *c == tokio_postgres::error::SqlState::T_R_DEADLOCK_DETECTED
            ),
            _ => false,
        }
    }
}

/// One transaction on either engine. Statements take `?1`, `?2`, ... parameters.
pub trait Tx {
    fn dialect(&self) -> Dialect;

    /// Runs a statement; the number of rows it changed.
    fn execute(&mut self, sql: &str, params: &[Value]) -> Result<u64, StoreError>;

    /// Runs a query; all its rows.
    fn query(&mut self, sql: &str, params: &[Value]) -> Result<Vec<Row>, StoreError>;

    /// Runs several statements without parameters (a schema step).
    fn batch(&mut self, sql: &str) -> Result<(), StoreError>;

    /// The first row, if any.
    fn query_opt(&mut self, sql: &str, params: &[Value]) -> Result<Option<Row>, StoreError> {
        Ok(self.query(sql, params)?.into_iter().next())
    }

    /// Exactly one row: a query that found none is an error.
    fn query_one(&mut self, sql: &str, params: &[Value]) -> Result<Row, StoreError> {
        self.query_opt(sql, params)?.ok_or(StoreError::NoRows)
    }
}

/// rusqlite's row-mapping calls, over either engine: the inventory's queries read as
/// they did when SQLite was the only store.
impl dyn Tx + '_ {
    /// The first row mapped by `f`; none is an error.
    pub fn query_row<T>(
        &mut self,
        sql: &str,
        params: &[Value],
        f: impl FnOnce(&Row) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        f(&self.query_one(sql, params)?)
    }

    /// The first row mapped by `f`, if there is one.
    pub fn query_row_opt<T>(
        &mut self,
        sql: &str,
        params: &[Value],
        f: impl FnOnce(&Row) -> Result<T, StoreError>,
    ) -> Result<Option<T>, StoreError> {
        self.query_opt(sql, params)?.as_ref().map(f).transpose()
    }

    /// Every row mapped by `f`.
    pub fn query_map<T>(
        &mut self,
        sql: &str,
        params: &[Value],
        f: impl FnMut(&Row) -> Result<T, StoreError>,
    ) -> Result<Vec<T>, StoreError> {
        self.query(sql, params)?.iter().map(f).collect()
    }
}

/// The error a transaction's body returns: any error of the caller's, which can hold a
/// [`StoreError`] and says whether it does (a lost race is retried, nothing else is).
pub trait TxError: From<StoreError> {
    fn store_error(&self) -> Option<&StoreError>;
}

impl TxError for StoreError {
    fn store_error(&self) -> Option<&StoreError> {
        Some(self)
    }
}

/// The inventory's database, of either engine.
#[derive(Debug)]
pub enum Store {
    Sqlite(SqliteStore),
    // One per endpoint, never moved after start: its size does not matter.
    Postgres(Box<PgStore>),
}

impl Store {
    pub fn dialect(&self) -> Dialect {
        match self {
            Store::Sqlite(_) => Dialect::Sqlite,
            Store::Postgres(_) => Dialect::Postgres,
        }
    }

    /// Runs `f` in one transaction that may write: committed when `f` returns `Ok`,
    /// rolled back when it returns `Err` or panics. Writers are serialized (SQLite's
    /// immediate transaction; PostgreSQL's SERIALIZABLE isolation), so a check and the
    /// write it allows (free space, a name not yet taken) cannot interleave with another
    /// endpoint's. On PostgreSQL a transaction that lost a race runs again, up to a few
    /// times, so `f` must not have effects outside the database.
    pub fn write<T, E: TxError>(&self, mut f: impl FnMut(&mut dyn Tx) -> Result<T, E>) -> Result<T, E> {
        match self {
            Store::Sqlite(store) => store.transaction(Access::Write, &mut f),
            Store::Postgres(store) => store.transaction(Access::Write, &mut f),
        }
    }

    /// Runs `f` as [`Store::write`] does, but each statement of it sees what other
    /// transactions committed before it (a schema upgrade that waited for another's).
    pub(crate) fn upgrade<T, E: TxError>(&self, mut f: impl FnMut(&mut dyn Tx) -> Result<T, E>) -> Result<T, E> {
        match self {
            Store::Sqlite(store) => store.transaction(Access::PerStatement, &mut f),
            Store::Postgres(store) => store.transaction(Access::PerStatement, &mut f),
        }
    }

    /// Runs `f` in one transaction that writes rows only by compare-and-set statements
    /// (`UPDATE ... WHERE` the row is still as expected): each statement sees the latest
    /// committed rows, so such writes need no SERIALIZABLE isolation and never lose a
    /// race to be run again (lease renewals of several endpoints at once).
    pub fn write_by_row<T, E: TxError>(&self, mut f: impl FnMut(&mut dyn Tx) -> Result<T, E>) -> Result<T, E> {
        match self {
            Store::Sqlite(store) => store.transaction(Access::PerStatement, &mut f),
            Store::Postgres(store) => store.transaction(Access::PerStatement, &mut f),
        }
    }

    /// Runs `f` in one read-only transaction: one consistent view of the database.
    pub fn read<T, E: TxError>(&self, mut f: impl FnMut(&mut dyn Tx) -> Result<T, E>) -> Result<T, E> {
        match self {
            Store::Sqlite(store) => store.transaction(Access::Read, &mut f),
            Store::Postgres(store) => store.transaction(Access::Read, &mut f),
        }
    }
}

/// Whether a transaction may write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Access {
    Read,
    Write,
    /// Each statement sees what other transactions committed before it (PostgreSQL's
    /// READ COMMITTED): a schema upgrade that waited for another endpoint's, and writes
    /// whose every statement is a compare-and-set of one row.
    PerStatement,
}

/// `?N` parameters as PostgreSQL's `$N`, leaving string literals and quoted names alone.
pub(crate) fn postgres_placeholders(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len());
    let mut quote = None;
    for c in sql.chars() {
        match (quote, c) {
            (None, '\'' | '"') => quote = Some(c),
            (Some(q), c) if c == q => quote = None,
            (None, '?') => {
                out.push('$');
                continue;
            }
            _ => {}
        }
        out.push(c);
    }
    out
}
