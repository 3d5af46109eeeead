//! The same checks on both engines: what the inventory relies on from its store.

use super::test_pg::TestPg;
use super::*;
use crate::store_params;

/// A store of each engine, with what keeps it alive.
fn stores() -> Vec<(Store, Box<dyn std::any::Any>)> {
    let dir = tempfile::tempdir().unwrap();
    let sqlite = Store::Sqlite(SqliteStore::open(&dir.path().join("inventory.db")).unwrap());
    let pg = TestPg::start();
    let postgres = Store::Postgres(Box::new(PgStore::connect(&pg.url).unwrap()));
    vec![(sqlite, Box::new(dir)), (postgres, Box::new(pg))]
}

fn create(store: &Store) {
    let ddl = match store.dialect() {
        Dialect::Sqlite => "CREATE TABLE vm (name TEXT PRIMARY KEY, size INTEGER, data BLOB, running INTEGER NOT NULL)",
        Dialect::Postgres => {
            "CREATE TABLE vm (name TEXT PRIMARY KEY, size BIGINT, data BYTEA, running BIGINT NOT NULL)"
        }
    };
    store.write(|tx| tx.batch(ddl)).unwrap();
}

#[test]
fn values_of_every_kind_round_trip() {
    for (store, _keep) in stores() {
        create(&store);
        store
            .write(|tx| {
                tx.execute(
                    "INSERT INTO vm (name, size, data, running) VALUES (?1, ?2, ?3, ?4)",
                    store_params!["web01", 1u64 << 40, vec![0u8, 1, 255], true],
                )?;
                tx.execute(
                    "INSERT INTO vm (name, size, data, running) VALUES (?1, ?2, ?3, ?4)",
                    store_params!["db01", None::<i64>, None::<Vec<u8>>, false],
                )
            })
            .unwrap();
        let rows = store
            .read(|tx| {
                tx.query(
                    "SELECT name, size, data, running FROM vm WHERE name <> '?x' ORDER BY name",
                    &[],
                )
            })
            .unwrap();
        assert_eq!(rows.len(), 2, "{:?}", store.dialect());
        assert_eq!(rows[0].get::<String>(0).unwrap(), "db01");
        assert_eq!(rows[0].get::<Option<u64>>(1).unwrap(), None);
        assert_eq!(rows[0].get::<Option<Vec<u8>>>(2).unwrap(), None);
        assert!(!rows[0].get::<bool>(3).unwrap());
        assert_eq!(rows[1].get::<u64>(1).unwrap(), 1 << 40);
        assert_eq!(rows[1].get::<Vec<u8>>(2).unwrap(), vec![0, 1, 255]);
        assert!(rows[1].get::<bool>(3).unwrap());
        // Reading a column as what it is not names the column and what it holds.
        let wrong = rows[1].get::<String>(1).unwrap_err().to_string();
        assert!(wrong.contains("column 1 holds an integer, not text"), "{wrong}");
        // Parameters reused and out of order.
        let row = store
            .read(|tx| tx.query_one("SELECT ?2 || '-' || ?1 || '-' || ?2", store_params!["a", "b"]))
            .unwrap();
        assert_eq!(row.get::<String>(0).unwrap(), "b-a-b");
    }
}

#[test]
fn a_name_is_taken_once_and_the_refusal_says_so() {
    for (store, _keep) in stores() {
        create(&store);
        let insert = |name: &str| {
            store.write(|tx| tx.execute("INSERT INTO vm (name, running) VALUES (?1, 0)", store_params![name]))
        };
        insert("web01").unwrap();
        let again = insert("web01").unwrap_err();
        assert!(again.is_unique_violation(), "{:?}: {again}", store.dialect());
        assert!(!again.is_retryable());
    }
}

#[test]
fn a_failed_transaction_leaves_nothing() {
    for (store, _keep) in stores() {
        create(&store);
        let failed: Result<(), StoreError> = store.write(|tx| {
            tx.execute("INSERT INTO vm (name, running) VALUES ('web01', 0)", &[])?;
            tx.execute("INSERT INTO vm (name, running) VALUES ('web01', 0)", &[])?;
            Ok(())
        });
        assert!(failed.is_err());
        let count = store.read(|tx| tx.query_one("SELECT COUNT(*) FROM vm", &[])).unwrap();
        assert_eq!(count.get::<i64>(0).unwrap(), 0, "{:?}", store.dialect());
        assert!(matches!(
            store.read(|tx| tx.query_one("SELECT name FROM vm", &[])),
            Err(StoreError::NoRows)
        ));
    }
}

#[test]
fn concurrent_writers_never_lose_an_update() {
    // Read, then write what was read plus one: SERIALIZABLE makes the loser of each
    // race fail and run again rather than overwrite the winner.
    for (store, _keep) in stores() {
        create(&store);
        store
            .write(|tx| tx.execute("INSERT INTO vm (name, size, running) VALUES ('counter', 0, 0)", &[]))
            .unwrap();
        let store = std::sync::Arc::new(store);
        let writers: Vec<_> = (0..4)
            .map(|_| {
                let store = store.clone();
                std::thread::spawn(move || {
                    for _ in 0..25 {
                        store
                            .write(|tx| {
                                let size: i64 = tx
                                    .query_one("SELECT size FROM vm WHERE name = 'counter'", &[])?
                                    .get(0)?;
                                tx.execute(
                                    "UPDATE vm SET size = ?1 WHERE name = 'counter'",
                                    store_params![size + 1],
                                )
                            })
                            .unwrap();
                    }
                })
            })
            .collect();
        for writer in writers {
            writer.join().unwrap();
        }
        let size = store.read(|tx| tx.query_one("SELECT size FROM vm", &[])).unwrap();
        assert_eq!(size.get::<i64>(0).unwrap(), 100, "{:?}", store.dialect());
    }
}

#[test]
fn the_database_clock_reads_as_milliseconds() {
    for (store, _keep) in stores() {
        let sql = format!("SELECT {}", store.dialect().now_ms());
        let db: i64 = store.read(|tx| tx.query_one(&sql, &[])?.get(0)).unwrap();
        let ours = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64;
        assert!((db - ours).abs() < 5_000, "{:?}: {db} against {ours}", store.dialect());
    }
}

#[test]
fn a_wrong_url_is_reported_with_what_to_check_and_no_password() {
    let e = PgStore::connect("postgres://gateway:s3cret@127.0.0.1:1/inventory")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("cannot reach PostgreSQL at postgres://gateway:***@127.0.0.1:1/inventory"),
        "{e}"
    );
    assert!(!e.contains("s3cret"), "{e}");
}

#[test]
fn placeholders_outside_quotes_become_dollars() {
    assert_eq!(
        postgres_placeholders("SELECT '?1', \"a?\" FROM t WHERE a = ?1 AND b = ?12"),
        "SELECT '?1', \"a?\" FROM t WHERE a = $1 AND b = $12"
    );
}
