//! [`SqliteLedger`], SpecForge's `SQLiteMetadataStore`: the durable online consumer ledger.
//!
//! The schema, the pragmas and the JSON spelling are SpecForge's own (they are part of its
//! recovery contract: its tests and tools read `acked` and `marker` directly), so a database
//! written by either implementation is read and extended by the other:
//!
//! ```text
//! committed(sample_id TEXT PRIMARY KEY, ref_json TEXT NOT NULL)  ref_json: json.dumps(ref), default spacing
//! acked(sample_id TEXT PRIMARY KEY)
//! marker(k TEXT PRIMARY KEY, v TEXT)  rows: global_step = JSON number, optimizer_durable = true|false
//! PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL
//! ```
//!
//! One connection, shared by all threads under a mutex. Every write is one `BEGIN IMMEDIATE`
//! transaction that commits whole or rolls back whole.

use super::{DurableMarker, Ledger};
use ferry_core::json::{sample_ref_from_str, sample_ref_to_string};
use ferry_core::{Error, JsonStyle, Result, SampleId, SampleRef};
use rusqlite::{Connection, OptionalExtension, Transaction, TransactionBehavior};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};

/// SpecForge's schema, statement for statement (SQLite records each `CREATE TABLE` text in
/// `sqlite_master` without the `IF NOT EXISTS`, so both implementations leave the same text).
const SCHEMA: &str = "\
CREATE TABLE IF NOT EXISTS committed (sample_id TEXT PRIMARY KEY, ref_json TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS acked (sample_id TEXT PRIMARY KEY);
CREATE TABLE IF NOT EXISTS marker (k TEXT PRIMARY KEY, v TEXT);";

const TABLES: [&str; 3] = ["committed", "acked", "marker"];

const GLOBAL_STEP_KEY: &str = "global_step";
const OPTIMIZER_DURABLE_KEY: &str = "optimizer_durable";

/// The SQLite files that make up one ledger: the database and, in WAL mode, its `-wal` and
/// `-shm` companions. A fresh attempt must find none of them.
fn ledger_files(path: &Path) -> [PathBuf; 3] {
    let with_suffix = |suffix: &str| {
        let mut name = path.as_os_str().to_owned();
        name.push(suffix);
        PathBuf::from(name)
    };
    [path.to_path_buf(), with_suffix("-wal"), with_suffix("-shm")]
}

fn path_exists(path: &Path, action: &str) -> Result<bool> {
    match fs::symlink_metadata(path) {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(Error::io(format!("{action}: checking {}", path.display()), &e)),
    }
}

fn sqlite_error(path: &Path, operation: &str, err: &rusqlite::Error) -> Error {
    Error::Backend {
        backend: "sqlite".to_owned(),
        operation: operation.to_owned(),
        key: path.display().to_string(),
        message: err.to_string(),
    }
}

/// Opens a connection with SpecForge's pragmas; creates no tables.
fn connect(path: &Path) -> Result<Connection> {
    let conn = Connection::open(path).map_err(|e| sqlite_error(path, "open", &e))?;
    let journal_mode: String = conn
        .pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))
        .map_err(|e| sqlite_error(path, "PRAGMA journal_mode=WAL", &e))?;
    if !journal_mode.eq_ignore_ascii_case("wal") {
        // SQLite keeps its old mode where WAL is impossible (some network file systems); the
        // ledger still works, but readers in other processes lose WAL's snapshot isolation.
        tracing::warn!(path = %path.display(), journal_mode, "SQLite refused WAL journal mode for the ledger");
    }
    conn.pragma_update(None, "synchronous", "FULL").map_err(|e| sqlite_error(path, "PRAGMA synchronous=FULL", &e))?;
    Ok(conn)
}

/// How many rows `committed` holds in the database at `path` (0 when it has no such table).
fn committed_rows_in(path: &Path) -> Result<u64> {
    let conn = Connection::open(path).map_err(|e| sqlite_error(path, "open", &e))?;
    let has_table: bool = conn
        .query_row(
            "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'committed')",
            [],
            |row| row.get(0),
        )
        .map_err(|e| sqlite_error(path, "read schema", &e))?;
    if !has_table {
        return Ok(0);
    }
    count_committed(&conn, path)
}

fn count_committed(conn: &Connection, path: &Path) -> Result<u64> {
    let count: i64 = conn
        .query_row("SELECT COUNT(*) FROM committed", [], |row| row.get(0))
        .map_err(|e| sqlite_error(path, "count committed", &e))?;
    u64::try_from(count).map_err(|_| Error::Corrupt {
        what: format!("metadata store {}", path.display()),
        message: format!("COUNT(*) returned {count}"),
    })
}

/// SpecForge's durable ledger over one SQLite database. See the module documentation for the
/// format.
#[derive(Debug)]
pub struct SqliteLedger {
    path: PathBuf,
    conn: Mutex<Connection>,
}

impl SqliteLedger {
    /// Opens (or creates) the ledger at `path`: creates the parent directory, sets the
    /// pragmas and creates any missing table. Checks no freshness rule; see
    /// [`SqliteLedger::open_fresh`] and [`SqliteLedger::open_existing`].
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            fs::create_dir_all(parent)
                .map_err(|e| Error::io(format!("creating the ledger directory {}", parent.display()), &e))?;
        }
        let conn = connect(path)?;
        conn.execute_batch(SCHEMA).map_err(|e| sqlite_error(path, "create schema", &e))?;
        Ok(SqliteLedger { path: path.to_path_buf(), conn: Mutex::new(conn) })
    }

    /// Opens a new ledger for a fresh online attempt, refusing to reuse anything: the database
    /// and its `-wal` / `-shm` files must not exist (SpecForge's launcher rule), and the opened
    /// ledger must hold no committed row (its consumer builder's rule, which also catches a
    /// database created by someone else in between).
    ///
    /// A fresh attempt that reused a ledger would skip or replay samples of another attempt.
    pub fn open_fresh(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let action = "opening a fresh metadata store";
        if path_exists(path, action)? {
            let shown = path.display();
            return Err(Error::InvalidArgument(match committed_rows_in(path) {
                Ok(0) => format!(
                    "metadata store {shown} already exists; a fresh online attempt cannot reuse a ledger; \
                     delete it (with its -wal/-shm files) or choose a new ledger path"
                ),
                Ok(held) => already_holds(path, held),
                Err(e) => format!(
                    "metadata store {shown} already exists and could not be read ({e}); a fresh online attempt \
                     cannot reuse a ledger; delete it (with its -wal/-shm files) or choose a new ledger path"
                ),
            }));
        }
        for leftover in ledger_files(path).iter().skip(1) {
            if path_exists(leftover, action)? {
                return Err(Error::InvalidArgument(format!(
                    "{} is left over from an earlier ledger at {}; a fresh online attempt cannot reuse a ledger; \
                     delete it or choose a new ledger path",
                    leftover.display(),
                    path.display()
                )));
            }
        }
        let ledger = Self::open(path)?;
        let held = ledger.committed_count()?;
        if held > 0 {
            return Err(Error::InvalidArgument(already_holds(path, held)));
        }
        Ok(ledger)
    }

    /// Opens the ledger of the attempt being resumed. The database must exist and hold
    /// SpecForge's three tables; nothing is created.
    pub fn open_existing(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        match fs::metadata(path) {
            Ok(meta) if meta.is_file() => {}
            Ok(_) => {
                return Err(Error::InvalidArgument(format!(
                    "metadata store {} is not a file; a resume needs the SQLite ledger of the attempt being resumed",
                    path.display()
                )));
            }
            Err(e) => {
                return Err(Error::io(
                    format!(
                        "resuming from metadata store {}: a resume needs the ledger of the attempt being resumed \
                         (check the ledger path), or start a fresh attempt",
                        path.display()
                    ),
                    &e,
                ));
            }
        }
        let conn = connect(path)?;
        let mut missing = Vec::new();
        for table in TABLES {
            let present: bool = conn
                .query_row(
                    "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?1)",
                    [table],
                    |row| row.get(0),
                )
                .map_err(|e| sqlite_error(path, "read schema", &e))?;
            if !present {
                missing.push(table);
            }
        }
        if !missing.is_empty() {
            return Err(Error::Corrupt {
                what: format!("metadata store {}", path.display()),
                message: format!(
                    "missing table(s) {}: not a SpecForge/ferry ledger; resume from the ledger the attempt wrote",
                    missing.join(", ")
                ),
            });
        }
        Ok(SqliteLedger { path: path.to_path_buf(), conn: Mutex::new(conn) })
    }

    /// The database path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Closes the connection and reports any error (dropping the ledger closes it silently).
    pub fn close(self) -> Result<()> {
        let conn = self.conn.into_inner().unwrap_or_else(PoisonError::into_inner);
        conn.close().map_err(|(_, e)| sqlite_error(&self.path, "close", &e))
    }

    fn error(&self, operation: &str) -> impl Fn(rusqlite::Error) -> Error + '_ {
        let operation = operation.to_owned();
        move |e| sqlite_error(&self.path, &operation, &e)
    }

    fn connection(&self) -> Result<MutexGuard<'_, Connection>> {
        // A panic while the lock was held unwound through any open `Transaction`, whose drop
        // rolled it back, so the connection is usable; make sure no transaction is left open.
        let conn = self.conn.lock().unwrap_or_else(PoisonError::into_inner);
        if !conn.is_autocommit() {
            conn.execute_batch("ROLLBACK").map_err(self.error("roll back an abandoned transaction"))?;
        }
        Ok(conn)
    }

    /// Runs `body` in one `BEGIN IMMEDIATE` transaction: commits when it succeeds, rolls the
    /// whole transaction back when it (or the commit) fails.
    fn write<T>(&self, operation: &str, body: impl FnOnce(&Transaction<'_>) -> rusqlite::Result<T>) -> Result<T> {
        let mut conn = self.connection()?;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(self.error(operation))?;
        match body(&tx) {
            // A failed COMMIT drops the transaction, which rolls it back.
            Ok(value) => tx.commit().map(|()| value).map_err(self.error(operation)),
            Err(err) => Err(match tx.rollback() {
                Ok(()) => sqlite_error(&self.path, operation, &err),
                Err(rollback) => Error::Backend {
                    backend: "sqlite".to_owned(),
                    operation: operation.to_owned(),
                    key: self.path.display().to_string(),
                    message: format!("{err}; ROLLBACK also failed: {rollback}"),
                },
            }),
        }
    }

    fn corrupt(&self, what: impl std::fmt::Display, message: String) -> Error {
        Error::Corrupt { what: format!("{what} in metadata store {}", self.path.display()), message }
    }

    fn parse_global_step(&self, text: Option<&str>) -> Result<Option<i64>> {
        let Some(text) = text else { return Ok(None) };
        match serde_json::from_str::<serde_json::Value>(text) {
            Ok(serde_json::Value::Null) => Ok(None),
            Ok(value) if value.as_i64().is_some() => Ok(value.as_i64()),
            _ => Err(self.corrupt("marker row global_step", format!("expected a JSON integer, found {text:?}"))),
        }
    }

    fn parse_optimizer_durable(&self, text: Option<&str>) -> Result<bool> {
        match text {
            None => Ok(false),
            Some(text) => serde_json::from_str::<bool>(text).map_err(|_| {
                self.corrupt("marker row optimizer_durable", format!("expected true or false, found {text:?}"))
            }),
        }
    }
}

fn already_holds(path: &Path, held: u64) -> String {
    format!(
        "metadata store {} already holds {held} committed samples; a fresh online attempt cannot reuse a ledger; \
         resume the attempt that wrote it, or delete it (with its -wal/-shm files) or choose a new ledger path",
        path.display()
    )
}

impl Ledger for SqliteLedger {
    fn commit_samples(&self, refs: &[SampleRef]) -> Result<Vec<bool>> {
        if refs.is_empty() {
            return Ok(Vec::new());
        }
        // Serialize before taking the lock: it is the slow part and needs no database.
        let rows = refs
            .iter()
            .map(|r| Ok((r.sample_id.as_str(), sample_ref_to_string(r, JsonStyle::Spaced)?)))
            .collect::<Result<Vec<_>>>()?;
        self.write("commit samples", |tx| {
            let mut insert =
                tx.prepare_cached("INSERT OR IGNORE INTO committed (sample_id, ref_json) VALUES (?1, ?2)")?;
            rows.iter().map(|(id, json)| Ok(insert.execute((id, json))? == 1)).collect()
        })
    }

    fn commit_records(&self, records: &[(SampleId, String)]) -> Result<Vec<bool>> {
        if records.is_empty() {
            return Ok(Vec::new());
        }
        self.write("commit samples", |tx| {
            let mut insert =
                tx.prepare_cached("INSERT OR IGNORE INTO committed (sample_id, ref_json) VALUES (?1, ?2)")?;
            records.iter().map(|(id, json)| Ok(insert.execute((id.as_str(), json))? == 1)).collect()
        })
    }

    fn is_committed(&self, id: &SampleId) -> Result<bool> {
        self.connection()?
            .query_row("SELECT EXISTS (SELECT 1 FROM committed WHERE sample_id = ?1)", [id.as_str()], |row| row.get(0))
            .map_err(self.error("read committed"))
    }

    fn get_committed(&self, id: &SampleId) -> Result<Option<SampleRef>> {
        let json: Option<String> = self
            .connection()?
            .query_row("SELECT ref_json FROM committed WHERE sample_id = ?1", [id.as_str()], |row| row.get(0))
            .optional()
            .map_err(self.error("read committed"))?;
        let Some(json) = json else { return Ok(None) };
        let r = sample_ref_from_str(&json).map_err(|e| match e {
            Error::Json { message, .. } => Error::Json {
                context: format!("ref_json of committed sample {id:?} in metadata store {}", self.path.display()),
                message,
            },
            other => other,
        })?;
        if r.sample_id != *id {
            return Err(self.corrupt(
                format!("committed row {id:?}"),
                format!("its ref_json names sample {:?}", r.sample_id.as_str()),
            ));
        }
        Ok(Some(r))
    }

    fn committed_count(&self) -> Result<u64> {
        let conn = self.connection()?;
        count_committed(&conn, &self.path)
    }

    fn all_committed_ids(&self) -> Result<Vec<SampleId>> {
        let conn = self.connection()?;
        let mut select = conn
            .prepare_cached("SELECT sample_id FROM committed ORDER BY rowid")
            .map_err(self.error("read committed"))?;
        let ids = select
            .query_map([], |row| row.get::<_, String>(0).map(SampleId::from))
            .and_then(Iterator::collect)
            .map_err(self.error("read committed"))?;
        Ok(ids)
    }

    fn record_train_ack(&self, ids: &[SampleId], global_step: Option<i64>, optimizer_durable: bool) -> Result<()> {
        self.write("record train ack", |tx| {
            let mut ack = tx.prepare_cached("INSERT OR IGNORE INTO acked (sample_id) VALUES (?1)")?;
            for id in ids {
                ack.execute([id.as_str()])?;
            }
            let mut set_marker = tx.prepare_cached("INSERT OR REPLACE INTO marker (k, v) VALUES (?1, ?2)")?;
            if let Some(step) = global_step {
                // json.dumps of a Python int: its decimal digits.
                set_marker.execute((GLOBAL_STEP_KEY, step.to_string()))?;
            }
            set_marker.execute((OPTIMIZER_DURABLE_KEY, if optimizer_durable { "true" } else { "false" }))?;
            Ok(())
        })
    }

    fn durable_marker(&self) -> Result<DurableMarker> {
        let mut conn = self.connection()?;
        // One read transaction: the acked set and the marker rows come from the same snapshot.
        let tx = conn.transaction().map_err(self.error("read marker"))?;
        let (acked, global_step, optimizer_durable) = {
            let mut select_acked =
                tx.prepare_cached("SELECT sample_id FROM acked").map_err(self.error("read acked"))?;
            let acked = select_acked
                .query_map([], |row| row.get::<_, String>(0).map(SampleId::from))
                .and_then(Iterator::collect)
                .map_err(self.error("read acked"))?;
            let mut select_marker =
                tx.prepare_cached("SELECT v FROM marker WHERE k = ?1").map_err(self.error("read marker"))?;
            let mut marker_value = |key: &str| -> Result<Option<String>> {
                select_marker
                    .query_row([key], |row| row.get::<_, Option<String>>(0))
                    .optional()
                    .map(Option::flatten)
                    .map_err(self.error("read marker"))
            };
            (acked, marker_value(GLOBAL_STEP_KEY)?, marker_value(OPTIMIZER_DURABLE_KEY)?)
        };
        tx.finish().map_err(self.error("read marker"))?;
        Ok(DurableMarker {
            acked,
            global_step: self.parse_global_step(global_step.as_deref())?,
            optimizer_durable: self.parse_optimizer_durable(optimizer_durable.as_deref())?,
        })
    }

    fn is_durable(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ledger_files_are_the_database_and_its_wal_companions() {
        let [db, wal, shm] = ledger_files(Path::new("/x/ledger.db"));
        assert_eq!(db, Path::new("/x/ledger.db"));
        assert_eq!(wal, Path::new("/x/ledger.db-wal"));
        assert_eq!(shm, Path::new("/x/ledger.db-shm"));
    }

    #[test]
    fn marker_values_parse_as_specforge_writes_them() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::io("tempdir", &e))?;
        let ledger = SqliteLedger::open(dir.path().join("l.db"))?;
        assert_eq!(ledger.parse_global_step(Some("17"))?, Some(17));
        assert_eq!(ledger.parse_global_step(Some("null"))?, None);
        assert_eq!(ledger.parse_global_step(None)?, None);
        assert!(matches!(ledger.parse_global_step(Some("1.5")), Err(Error::Corrupt { .. })));
        assert!(ledger.parse_optimizer_durable(Some("true"))?);
        assert!(!ledger.parse_optimizer_durable(Some("false"))?);
        assert!(!ledger.parse_optimizer_durable(None)?);
        assert!(matches!(ledger.parse_optimizer_durable(Some("1")), Err(Error::Corrupt { .. })));
        Ok(())
    }

    #[test]
    fn empty_batch_touches_nothing() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::io("tempdir", &e))?;
        let ledger = SqliteLedger::open(dir.path().join("nested/dir/l.db"))?;
        assert_eq!(ledger.commit_samples(&[])?, Vec::<bool>::new());
        assert_eq!(ledger.committed_count()?, 0);
        assert!(ledger.is_durable() && ledger.retains());
        ledger.close()
    }
}
