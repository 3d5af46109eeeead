//! An edge agent that speaks the migration protocol by hand, for tests that must send
//! what the real one never would (hostile plans and chunk frames) or stop half-way
//! (holding a migration slot).

use std::time::Duration;

use gateway::chunk::Sealer;
use gateway::plan::{DiskSpec, MigrationPlan, VmSpec, DEFAULT_CHUNK_SIZE};
use gateway::transport::{ControlReader, ControlWriter, DataWriter, TransportError, TransportTuning};
use gateway::wire::{ChunkHeader, CloudMessage, EdgeMessage, RefusalCode};

use crate::{Cloud, Pki, DEMO_PASSWORD, MIGRATOR};

/// An edge agent that speaks the protocol by hand, so a test can send what the real
/// one never would. Built from the same gateway pieces (`Target::connect`, the control
/// and data stream writers, `Sealer`).
#[derive(Debug)]
pub struct RawEdge {
    _endpoint: quinn::Endpoint,
    pub conn: quinn::Connection,
    tx: ControlWriter,
    rx: ControlReader,
    data: Option<DataWriter>,
    /// Chunk frames written so far: a seal states how many the cloud is to wait for.
    frames: u64,
}

impl RawEdge {
    /// Handshake, control stream, Hello as the migrator, Welcome.
    pub async fn welcomed(cloud: &Cloud, pki: &Pki) -> RawEdge {
        let target = cloud.target(pki, MIGRATOR, DEMO_PASSWORD);
        let (endpoint, conn) = target.connect(&TransportTuning::default()).await.expect("handshake");
        let (send, recv) = conn.open_bi().await.unwrap();
        let mut edge = RawEdge {
            _endpoint: endpoint,
            tx: ControlWriter::open(send, true).await.unwrap(),
            rx: ControlReader::open(recv, false).await.unwrap(),
            conn,
            data: None,
            frames: 0,
        };
        edge.send(&EdgeMessage::Hello {
            agent: "raw-edge".into(),
            user: MIGRATOR.into(),
            password: DEMO_PASSWORD.into(),
        })
        .await;
        match edge.recv().await {
            CloudMessage::Welcome { .. } => edge,
            other => panic!("expected Welcome, got {other:?}"),
        }
    }

    pub async fn send(&mut self, msg: &EdgeMessage) {
        self.tx.send(msg).await.expect("control stream open");
    }

    /// Sends `msg`; an error is the endpoint having closed the stream or the connection,
    /// which a test of a refusal expects at some point.
    pub async fn try_send(&mut self, msg: &EdgeMessage) -> Result<(), TransportError> {
        self.tx.send(msg).await
    }

    pub async fn recv(&mut self) -> CloudMessage {
        tokio::time::timeout(Duration::from_secs(20), self.rx.recv::<CloudMessage>())
            .await
            .expect("the endpoint answers within 20 s")
            .expect("control stream readable")
            .expect("a message, not the end of the stream")
    }

    /// The plan's migration id, or the refusal.
    pub async fn plan(&mut self, plan: &MigrationPlan) -> Result<String, (RefusalCode, Vec<String>)> {
        self.send(&EdgeMessage::Plan(plan.clone())).await;
        match self.recv().await {
            CloudMessage::PlanAccepted { migration_id, .. } => Ok(migration_id),
            CloudMessage::Refused { code, problems } => Err((code, problems)),
            other => panic!("expected an answer to the plan, got {other:?}"),
        }
    }

    /// Writes one chunk frame on this edge's data stream. An error is the endpoint
    /// having stopped the stream, which a refusal test expects.
    pub async fn chunk(&mut self, header: &ChunkHeader, payload: &[u8]) -> Result<(), TransportError> {
        if self.data.is_none() {
            self.data = Some(DataWriter::open(&self.conn).await?);
        }
        self.frames += 1;
        self.data.as_mut().expect("opened").send_chunk(header, payload).await
    }

    /// The next message that is not an acknowledgement.
    pub async fn next_not_ack(&mut self) -> CloudMessage {
        loop {
            match self.recv().await {
                CloudMessage::Acks { .. } => continue,
                other => return other,
            }
        }
    }

    pub async fn refusal(&mut self) -> (RefusalCode, Vec<String>) {
        match self.next_not_ack().await {
            CloudMessage::Refused { code, problems } => (code, problems),
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    /// Waits until every one of `offsets` of disk 0 is acknowledged (acks come batched;
    /// a Nack or a refusal fails the test).
    pub async fn acked(&mut self, offsets: &[u64]) {
        let mut waiting: std::collections::BTreeSet<u64> = offsets.iter().copied().collect();
        while !waiting.is_empty() {
            match self.recv().await {
                CloudMessage::Acks { disk: 0, offsets } => {
                    for o in offsets {
                        waiting.remove(&o);
                    }
                }
                other => panic!("expected the acks of offsets {waiting:?}, got {other:?}"),
            }
        }
    }

    /// Seals disk 0 (one chunk hash per chunk of `disk`, every frame written counted) and
    /// commits; returns the VM id.
    pub async fn seal_and_commit(&mut self, disk: &[u8]) -> String {
        let hashes: Vec<[u8; 32]> = disk
            .chunks(DEFAULT_CHUNK_SIZE as usize)
            .map(gateway::chunk::chunk_hash)
            .collect();
        self.send(&EdgeMessage::DiskSealed {
            disk: 0,
            root: gateway::merkle::root(&hashes),
            frames: self.frames,
        })
        .await;
        self.send(&EdgeMessage::Commit).await;
        let mut answer = self.next_not_ack().await;
        // The migration report comes just before the commit's answer.
        if let CloudMessage::Report(_) = answer {
            answer = self.next_not_ack().await;
        }
        match answer {
            CloudMessage::Committed { vm_id, .. } => {
                self.close();
                vm_id
            }
            other => panic!("expected Committed, got {other:?}"),
        }
    }

    pub fn close(&self) {
        self.conn.close(0u32.into(), b"done");
    }
}

/// A plan for a VM with `disks` (key, capacity) and no NIC.
pub fn plan(name: &str, disks: &[(&str, u64)], chunk_size: u32) -> MigrationPlan {
    MigrationPlan {
        vm: VmSpec {
            name: name.into(),
            guest_os: "debian12-64".into(),
            num_cpus: 1,
            cores_per_socket: None,
            memory_mib: 512,
            firmware: None,
            bios_uuid: None,
            nics: vec![],
            controllers: vec![],
            disks: disks
                .iter()
                .map(|(key, capacity)| DiskSpec {
                    key: (*key).into(),
                    capacity: *capacity,
                })
                .collect(),
        },
        network_map: vec![],
        chunk_size,
        disk_format: None,
        firewall: Default::default(),
        placement: Default::default(),
        source_descriptor_sha256: Some(gateway::chunk::sha256(name.as_bytes())),
        seed: None,
    }
}

/// A chunk of disk 0 as the real edge seals it.
pub fn sealed(offset: u64, plain: &[u8]) -> (ChunkHeader, Vec<u8>) {
    let mut payload = Vec::new();
    let header = Sealer::new(1).unwrap().seal(0, offset, plain, &mut payload);
    (header, payload)
}
