//! Several endpoint processes serving one domain (issue 18): one throwaway PostgreSQL
//! server holds the inventory, one folder is the datastore they all write (a shared
//! volume's stand-in), each endpoint is a host of the cluster. Edges race for a VM name
//! across endpoints, every endpoint's API shows the one inventory, and an endpoint
//! killed mid-transfer hands its migration over to another.

use std::net::SocketAddr;

use e2e::rest::Rest;
use e2e::scale_out::*;
use e2e::*;

/// The VMs an endpoint's API lists: (name, id), sorted.
async fn vms_listed(pki: &Pki, api: SocketAddr) -> Vec<(String, String)> {
    let rest = Rest::at(&format!("https://{api}"), pki);
    let token = rest.token(MIGRATOR).await;
    let list = rest.json("/api/vcenter/vm", &token).await;
    let mut vms: Vec<(String, String)> = list
        .as_array()
        .expect("a list of VMs")
        .iter()
        .map(|vm| {
            (
                vm["name"].as_str().unwrap().to_owned(),
                vm["vm"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    vms.sort();
    vms
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_endpoints_race_for_one_name_and_every_endpoint_shows_one_inventory() {
    let tmp = tempfile::tempdir().unwrap();
    let domain = Domain::new(tmp.path());
    let endpoints = [
        domain.endpoint("esx-a"),
        domain.endpoint("esx-b"),
        domain.endpoint("esx-c"),
    ];
    // Two on-prem sites lift a VM of the same name at once, one through esx-a, one
    // through esx-b: the database lets exactly one have the name.
    let (one, two) = (tmp.path().join("site-1"), tmp.path().join("site-2"));
    let (vmx_1, vmx_2) = (vm(&one, "race01", 2, 1), vm(&two, "race01", 2, 2));
    let (out_1, out_2) = tokio::join!(
        run(domain.migrate(&one, &vmx_1, &[endpoints[0].quic])),
        run(domain.migrate(&two, &vmx_2, &[endpoints[1].quic]))
    );
    let won: Vec<bool> = [&out_1, &out_2].iter().map(|o| o.status.success()).collect();
    assert_eq!(
        won.iter().filter(|w| **w).count(),
        1,
        "exactly one lift of the name wins:\n{}\n{}\n{}\n{}",
        String::from_utf8_lossy(&out_1.stdout),
        String::from_utf8_lossy(&out_1.stderr),
        String::from_utf8_lossy(&out_2.stdout),
        String::from_utf8_lossy(&out_2.stderr)
    );
    let (winner, loser, source) = if won[0] {
        (&out_1, &out_2, &one)
    } else {
        (&out_2, &out_1, &two)
    };
    let refusal = format!(
        "{}{}",
        String::from_utf8_lossy(&loser.stdout),
        String::from_utf8_lossy(&loser.stderr)
    );
    assert!(refusal.contains("race01"), "the loser is told which name: {refusal}");
    let vm_id = summary(winner)["vm_id"].as_str().unwrap().to_owned();
    assert!(images_identical(
        &source.join("race01.img"),
        &domain.datastore.join("race01/race01-flat.vmdk")
    ));
    // Every endpoint's API lists the same one VM, under the same id.
    for endpoint in &endpoints {
        assert_eq!(
            vms_listed(&domain.pki, endpoint.api).await,
            vec![("race01".to_owned(), vm_id.clone())],
            "the inventory as endpoint {} shows it",
            endpoint.api
        );
    }
    assert!(domain.staging_left().is_empty(), "{:?}", domain.staging_left());
    // The loser's migration ended, and no endpoint holds a lease any more.
    let inventory = domain.inventory();
    for host in ["esx-a", "esx-b", "esx-c"] {
        let held = inventory
            .leases_held_by(host, cloud_endpoint::inventory::LeaseClock::Database)
            .unwrap();
        assert!(held.is_empty(), "{host} holds {held:?}");
    }
}

/// esx-a is killed with SIGKILL mid-transfer; the edge, which names esx-a and esx-b,
/// resumes on esx-b once esx-a's lease has run out. One VM is registered, identical to
/// the source; no staging is left; esx-a, started again, joins and holds no lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_killed_mid_transfer_hands_its_migration_to_another() {
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use edge_agent::target::{Endpoint, Target};
    use gateway::transport::Rate;

    let tmp = tempfile::tempdir().unwrap();
    let domain = Domain::new(tmp.path());
    let mut esx_a = domain.endpoint("esx-a");
    let esx_b = domain.endpoint("esx-b");
    let vmx = vm(&tmp.path().join("src"), "kv01", 24, 83);
    let source = edge_agent::source::open_vm(&vmx).unwrap();
    let mut target = Target::single(
        esx_a.quic,
        "localhost",
        MIGRATOR,
        DEMO_PASSWORD,
        domain.pki.trust_ca(),
        domain.pki.edge_identity(),
    );
    target.endpoints.push(Endpoint::new(esx_b.quic, "localhost"));
    let receipt = tmp.path().join("kv01.receipt.json");
    let opts = edge_agent::migrate::MigrateOptions {
        max_rate: Some("64mbit".parse::<Rate>().unwrap()),
        retry_for: Duration::from_secs(90),
        tuning: gateway::transport::TransportTuning {
            idle_timeout: Duration::from_secs(3),
            ..Default::default()
        },
        state_dir: Some(tmp.path().join("state")),
        receipt_path: Some(receipt.clone()),
        ..Default::default()
    };
    let sink = Arc::new(Watch::default());
    let lift = {
        let sink = sink.clone();
        tokio::spawn(async move { edge_agent::migrate::run(&source, &target, &opts, sink).await })
    };
    let total = 24 * MIB as u64;
    let done_at_kill = sink.until_done(total / 3, Duration::from_secs(60)).await;
    let killed = Instant::now();
    drop(esx_a);
    let mut moved_on = None;
    while !lift.is_finished() {
        if moved_on.is_none() && sink.done() > done_at_kill {
            moved_on = Some(killed.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(killed.elapsed() < Duration::from_secs(180), "the lift ends");
    }
    let summary = lift.await.unwrap().expect("the edge resumes at esx-b by itself");
    let said = sink.said.lock().unwrap().clone();
    println!(
        "esx-a killed at {done_at_kill} of {total} bytes; the migration moved on after {moved_on:?} \
         (lease {LEASE_SECS} s, edge idle timeout 3 s); {} resumed, {} re-sent, {} failover(s); the edge said: {said:#?}",
        summary.resumed_bytes, summary.resent_bytes, summary.failovers
    );
    assert_eq!(summary.endpoint, esx_b.quic.to_string(), "{summary:?}");
    assert_eq!(summary.failovers, 1, "{summary:?}");
    assert!(summary.resumed_bytes > 0, "resumed, not started again: {summary:?}");
    assert!(images_identical(
        &tmp.path().join("src/kv01.img"),
        &domain.datastore.join("kv01/kv01-flat.vmdk")
    ));
    let verdict = edge_agent::receipt::verify(&receipt, &vmx, &domain.pki.trust_ca()).unwrap();
    assert!(verdict.ok(), "{verdict}");
    assert!(domain.staging_left().is_empty(), "{:?}", domain.staging_left());
    // Registered once, by one migration that succeeded.
    let inventory = domain.inventory();
    let migrations = inventory.list_migrations().unwrap();
    assert_eq!(migrations.len(), 1, "{migrations:?}");
    assert_eq!(migrations[0].state, "SUCCEEDED", "{migrations:?}");
    assert_eq!(vms_listed(&domain.pki, esx_b.api).await.len(), 1);
    // esx-a comes back: it joins the domain and takes no lease it does not hold.
    esx_a = domain.endpoint("esx-a");
    assert_eq!(
        vms_listed(&domain.pki, esx_a.api).await,
        vms_listed(&domain.pki, esx_b.api).await
    );
    for host in ["esx-a", "esx-b"] {
        let held = inventory
            .leases_held_by(host, cloud_endpoint::inventory::LeaseClock::Database)
            .unwrap();
        assert!(held.is_empty(), "{host} holds {held:?}");
    }
    assert!(
        !esx_a
            .log()
            .iter()
            .any(|l| l.contains("interrupted by a restart") || l.contains("removed leftover")),
        "{:#?}",
        esx_a.log()
    );
}

/// 24 lifts from 4 edges spread over three endpoints: every VM registered once and
/// identical, every endpoint served some, every endpoint's API lists all 24.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_four_lifts_from_four_edges_spread_over_three_endpoints() {
    let tmp = tempfile::tempdir().unwrap();
    let domain = std::sync::Arc::new(Domain::new(tmp.path()));
    let endpoints = [
        domain.endpoint("esx-a"),
        domain.endpoint("esx-b"),
        domain.endpoint("esx-c"),
    ];
    let quic: Vec<SocketAddr> = endpoints.iter().map(|e| e.quic).collect();
    let edges: Vec<_> = (0..4)
        .map(|edge| {
            let (domain, quic, root) = (domain.clone(), quic.clone(), tmp.path().join(format!("edge-{edge}")));
            tokio::task::spawn_blocking(move || {
                (0..6)
                    .map(|i| {
                        let name = format!("e{edge}vm{i}");
                        let dir = root.join(&name);
                        let vmx = vm(&dir, &name, 1, (edge * 10 + i) as u64);
                        // Each lift names all three, starting at a different one.
                        let first = (edge + i) % 3;
                        let order: Vec<SocketAddr> = (0..3).map(|k| quic[(first + k) % 3]).collect();
                        let mut edge_cmd = domain.migrate(&dir, &vmx, &order);
                        let out = edge_cmd.output().expect("edge-agent runs");
                        let s = summary(&out);
                        (name, dir, s["endpoint"].as_str().unwrap_or_default().to_owned())
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let mut lifted = Vec::new();
    for edge in edges {
        lifted.extend(edge.await.unwrap());
    }
    assert_eq!(lifted.len(), 24);
    for (name, dir, _) in &lifted {
        assert!(
            images_identical(
                &dir.join(format!("{name}.img")),
                &domain.datastore.join(format!("{name}/{name}-flat.vmdk"))
            ),
            "{name}"
        );
    }
    for endpoint in &quic {
        let served = lifted.iter().filter(|(_, _, e)| *e == endpoint.to_string()).count();
        assert!(served > 0, "endpoint {endpoint} served no lift: {lifted:?}");
    }
    let first = vms_listed(&domain.pki, endpoints[0].api).await;
    assert_eq!(first.len(), 24, "{first:?}");
    for endpoint in &endpoints[1..] {
        assert_eq!(vms_listed(&domain.pki, endpoint.api).await, first);
    }
    let migrations = domain.inventory().list_migrations().unwrap();
    assert_eq!(migrations.len(), 24);
    assert!(migrations.iter().all(|m| m.state == "SUCCEEDED"), "{migrations:?}");
    assert!(domain.staging_left().is_empty(), "{:?}", domain.staging_left());
}
