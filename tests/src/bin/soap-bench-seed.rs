//! Fills a cloud endpoint's inventory with N registered VMs (two disks on two
//! controllers, two NICs each) without lifting them, for tests/soap-bench.sh: the SOAP
//! and REST APIs read the inventory only, so no disk file is needed.
//!
//! Usage: soap-bench-seed DATABASE N   (the endpoint's built-in domain, as `serve` makes it)

use std::path::PathBuf;

use cloud_endpoint::config::{DomainConfig, Role};
use cloud_endpoint::inventory::{Inventory, NewDisk, NewNic, NewVm, Principal};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let usage = "usage: soap-bench-seed DATABASE N";
    let db = PathBuf::from(args.next().ok_or(usage)?);
    let n: usize = args.next().ok_or(usage)?.parse().map_err(|_| usage)?;
    let inv = Inventory::open(&db, &DomainConfig::default())?;
    let nets = inv.networks()?;
    let operator = Principal {
        user: "migrator@cloud.local".into(),
        role: Role::MigrationOperator,
    };
    for i in 0..n {
        let name = format!("bench{i:04}");
        let disk = |slot: &str, file: &str, size: u64| NewDisk {
            key: slot.into(),
            path: format!("[cloud-ds1] {name}/{file}"),
            capacity_bytes: size,
            datastore: None,
        };
        let nic = |k: usize| NewNic {
            key: format!("ethernet{k}"),
            network_id: nets[k % nets.len()].id.clone(),
            mac: Some(format!("00:50:56:{:02x}:{:02x}:{:02x}", k, i >> 8, i & 0xff)),
            virtual_dev: Some("vmxnet3".into()),
            address_type: Some("static".into()),
            source_network: "VM Network".into(),
        };
        let vm = NewVm {
            name: name.clone(),
            guest_os: "debian12-64".into(),
            num_cpus: 2,
            cores_per_socket: Some(1),
            memory_mib: 2048,
            firmware: Some("bios".into()),
            bios_uuid: None,
            vmx_path: format!("[cloud-ds1] {name}/{name}.vmx"),
            disks: vec![
                disk("scsi0:0", &format!("{name}.vmdk"), 16 << 30),
                disk("sata0:0", &format!("{name}_1.vmdk"), 1 << 30),
            ],
            controllers: Vec::new(),
            nics: vec![nic(0), nic(1)],
            firewall: Default::default(),
            placement: Default::default(),
        };
        let migration = inv.begin_migration(&operator, "soap-bench", &name, 1)?;
        inv.register_vm(&migration, &vm, |_| Ok("soap-bench seed: no receipt".into()))?;
    }
    println!("{n} VMs registered in {}", db.display());
    Ok(())
}
