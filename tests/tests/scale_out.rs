//! Several endpoint processes serving one domain (issue 18): one throwaway PostgreSQL
//! server holds the inventory, one folder is the datastore they all write (a shared
//! volume's stand-in), each endpoint is a host of the cluster. Edges race for a VM name
//! across endpoints, every endpoint's API shows the one inventory, and an endpoint
//! killed mid-transfer hands its migration over to another.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;

use e2e::rest::Rest;
use e2e::scale_out::*;
use e2e::*;

/// `edge-agent migrate --json` of `vmx` to `endpoint`, its state in `dir`.
fn migrate(domain: &Domain, dir: &Path, vmx: &Path, endpoint: SocketAddr) -> std::process::Command {
    let mut cmd = edge_at(&domain.bin, &domain.pki, endpoint.port(), MIGRATOR, "migrate");
    cmd.arg("--vmx")
        .arg(vmx)
        .arg("--state-dir")
        .arg(dir.join("state"))
        .arg("--receipt")
        .arg(dir.join("receipt.json"))
        .arg("--json")
        .env_remove("EDGE_AGENT_LOG_FORMAT")
        .stdin(Stdio::null());
    cmd
}

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
        run(migrate(&domain, &one, &vmx_1, endpoints[0].quic)),
        run(migrate(&domain, &two, &vmx_2, endpoints[1].quic))
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
