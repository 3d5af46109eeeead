//! The QMP framing and routing against a fake QEMU on a unix socket in a temp dir: it
//! tests our parser and our id matching, not QEMU (the process tests use a real one).

use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixListener;

use super::*;

#[test]
fn messages_of_each_shape_parse() {
    let greeting = br#"{"QMP": {"version": {"qemu": {"micro": 2, "minor": 0, "major": 10}, "package": ""}, "capabilities": ["oob"]}}"#;
    let Message::Greeting(g) = parse_message(greeting).unwrap() else {
        panic!("not a greeting")
    };
    assert_eq!(g["version"]["qemu"]["major"], 10);
    assert_eq!(
        parse_message(b"{\"return\": {}, \"id\": 7}\r").unwrap(),
        Message::Return {
            id: Some(json!(7)),
            value: json!({})
        }
    );
    assert_eq!(
        parse_message(
            br#"{"id": 3, "error": {"class": "CommandNotFound", "desc": "The command nope has not been found"}}"#
        )
        .unwrap(),
        Message::Error {
            id: Some(json!(3)),
            class: "CommandNotFound".into(),
            desc: "The command nope has not been found".into()
        }
    );
    assert_eq!(
        parse_message(
            br#"{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "SHUTDOWN", "data": {"guest": true}}"#
        )
        .unwrap(),
        Message::Event(QmpEvent {
            name: "SHUTDOWN".into(),
            data: json!({"guest": true})
        })
    );
    assert_eq!(
        parse_message(br#"{"event": "STOP"}"#).unwrap(),
        Message::Event(QmpEvent {
            name: "STOP".into(),
            data: Value::Null
        })
    );
    for bad in [
        &b"not json"[..],
        b"[1,2]",
        b"{\"hello\": 1}",
        b"{\"error\": {\"class\": \"X\"}}",
        b"{\"event\": 5}",
    ] {
        assert!(
            matches!(parse_message(bad), Err(QemuError::QmpMalformed(_))),
            "{}",
            String::from_utf8_lossy(bad)
        );
    }
}

#[tokio::test]
async fn frames_split_across_reads_join_and_long_ones_are_refused() {
    let (client, mut server) = tokio::io::duplex(8);
    let mut reader = BufReader::with_capacity(4, client);
    tokio::spawn(async move {
        server.write_all(b"{\"return\": 1}\r\n{\"ret").await.unwrap();
        server.write_all(b"urn\": 2}\r\n").await.unwrap();
        server.write_all(&[b'x'; 100]).await.unwrap();
    });
    let mut buf = Vec::new();
    assert!(read_frame(&mut reader, &mut buf, 64).await.unwrap());
    assert_eq!(buf, b"{\"return\": 1}\r");
    assert!(read_frame(&mut reader, &mut buf, 64).await.unwrap());
    assert_eq!(buf, b"{\"return\": 2}\r");
    assert!(matches!(
        read_frame(&mut reader, &mut buf, 64).await,
        Err(QemuError::QmpTooLong { max: 64 })
    ));
    assert!(buf.len() <= 64, "the buffer stayed within the cap");

    let (client, server) = tokio::io::duplex(8);
    drop(server);
    let mut reader = BufReader::new(client);
    assert!(!read_frame(&mut reader, &mut buf, 64).await.unwrap(), "end of stream");
}

/// A fake QEMU: greets, accepts `qmp_capabilities`, then answers two commands in the
/// reverse order of their arrival, sends an event, refuses a third command, and hangs up
/// on a fourth.
async fn fake_qemu(listener: UnixListener) {
    let (stream, _) = listener.accept().await.unwrap();
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read).lines();
    write
        .write_all(b"{\"QMP\": {\"version\": {\"qemu\": {\"major\": 10, \"minor\": 0, \"micro\": 2}}, \"capabilities\": []}}\r\n")
        .await
        .unwrap();
    macro_rules! next {
        () => {
            serde_json::from_str::<Value>(&lines.next_line().await.unwrap().unwrap()).unwrap()
        };
    }
    let caps = next!();
    assert_eq!(caps["execute"], "qmp_capabilities");
    assert!(caps.get("arguments").is_none());
    write
        .write_all(format!("{{\"return\": {{}}, \"id\": {}}}\r\n", caps["id"]).as_bytes())
        .await
        .unwrap();
    let first = next!();
    let second = next!();
    let mut by_name = [first, second];
    by_name.sort_by_key(|c| c["execute"].as_str().unwrap().to_owned());
    let [query_name, query_status] = by_name;
    assert_eq!(query_status["execute"], "query-status");
    assert_eq!(query_name["arguments"], json!({"detail": true}));
    for (cmd, value) in [
        (&query_status, json!({"status": "running", "running": true})),
        (&query_name, json!({"name": "vm1"})),
    ] {
        write
            .write_all(format!("{}\r\n", json!({"return": value, "id": cmd["id"]})).as_bytes())
            .await
            .unwrap();
    }
    write
        .write_all(b"{\"timestamp\": {\"seconds\": 1, \"microseconds\": 0}, \"event\": \"RESET\", \"data\": {\"guest\": false}}\r\n")
        .await
        .unwrap();
    let bad = next!();
    write
        .write_all(
            format!(
                "{}\r\n",
                json!({"error": {"class": "CommandNotFound", "desc": "The command nope has not been found"}, "id": bad["id"]})
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    let _hang_up_on = next!();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_commands_get_their_own_replies_events_and_errors() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("qmp.sock");
    let server = tokio::spawn(fake_qemu(UnixListener::bind(&path).unwrap()));
    let qmp = Qmp::connect(&path).await.unwrap();
    assert_eq!(qmp.greeting()["version"]["qemu"]["major"], 10);
    let mut events = qmp.events();

    let a = qmp.clone();
    let status = tokio::spawn(async move { a.execute("query-status", Value::Null).await });
    let name = qmp.execute("query-name", json!({"detail": true}));
    let name = name.await.unwrap();
    assert_eq!(name, json!({"name": "vm1"}));
    assert_eq!(status.await.unwrap().unwrap()["status"], "running");

    let reset = qmp
        .wait_for_event(&mut events, "RESET", Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(reset.data, json!({"guest": false}));

    match qmp.execute("nope", Value::Null).await {
        Err(QemuError::Command { command, class, desc }) => {
            assert_eq!(command, "nope");
            assert_eq!(class, "CommandNotFound");
            assert!(desc.contains("nope"), "{desc}");
        }
        other => panic!("{other:?}"),
    }

    // The fake hangs up on this one: the caller learns it, and so does everyone after.
    assert!(matches!(
        qmp.execute("quit", Value::Null).await,
        Err(QemuError::Disconnected)
    ));
    server.await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), qmp.closed())
        .await
        .unwrap();
    assert!(qmp.is_closed());
    assert!(matches!(
        qmp.execute("query-status", Value::Null).await,
        Err(QemuError::Disconnected)
    ));
    assert!(matches!(
        qmp.wait_for_event(&mut events, "SHUTDOWN", Duration::from_secs(5))
            .await,
        Err(QemuError::Disconnected)
    ));
}

#[tokio::test]
async fn a_peer_that_is_not_qmp_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("qmp.sock");
    let listener = UnixListener::bind(&path).unwrap();
    tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        stream.write_all(b"{\"return\": {}}\r\n").await.unwrap();
        tokio::time::sleep(Duration::from_secs(1)).await;
    });
    assert!(matches!(Qmp::connect(&path).await, Err(QemuError::QmpMalformed(_))));
}
