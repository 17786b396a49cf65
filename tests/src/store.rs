//! The datastore as a (synchronous) test writes to it: a real etcd through calico-datastore.

use anyhow::Result;
use calico_datastore::{Datastore, EtcdConfig};
use calico_model::{parse_documents, Kind};

use crate::Etcd;

pub struct Store {
    pub rt: tokio::runtime::Runtime,
    pub ds: Datastore,
}

impl Store {
    pub fn connect(etcd: &Etcd) -> Result<Self> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let ds = rt.block_on(Datastore::connect(&EtcdConfig::with_endpoints([
            etcd.endpoint()
        ])))?;
        Ok(Self { rt, ds })
    }

    /// Applies every document of `yaml` (as `calicoctl apply` does).
    pub fn apply(&self, yaml: &str) -> Result<()> {
        for r in parse_documents(yaml)? {
            self.rt.block_on(self.ds.apply(r))?;
        }
        Ok(())
    }

    /// Writes every document of `yaml` straight to its etcd key, without the validation every
    /// calico writer applies: what a hostile or buggy writer could leave for the agent.
    pub fn put_unvalidated(&self, yaml: &str) -> Result<()> {
        for r in parse_documents(yaml)? {
            let key = calico_datastore::keys::key_for(&r).map_err(anyhow::Error::msg)?;
            let value = serde_json::to_vec(&r)?;
            self.rt.block_on(self.ds.etcd().put(key, value, None))?;
        }
        Ok(())
    }

    /// Writes `resources` straight to their keys, many at a time: 128 puts per transaction
    /// (etcd's default `--max-txn-ops`), several transactions in flight. For filling a
    /// datastore with a large cluster's objects quickly; no validation, no read first.
    pub fn put_many(&self, resources: &[calico_model::Resource]) -> Result<()> {
        use etcd_client::{Txn, TxnOp};
        const OPS_PER_TXN: usize = 128;
        const IN_FLIGHT: usize = 8;
        let mut txns = Vec::new();
        for chunk in resources.chunks(OPS_PER_TXN) {
            let mut ops = Vec::with_capacity(chunk.len());
            for r in chunk {
                let key = calico_datastore::keys::key_for(r).map_err(anyhow::Error::msg)?;
                ops.push(TxnOp::put(key, calico_datastore::encode(r)?, None));
            }
            txns.push(Txn::new().and_then(ops));
        }
        let client = self.ds.etcd();
        self.rt.block_on(async {
            let mut pending = tokio::task::JoinSet::new();
            for txn in txns {
                if pending.len() >= IN_FLIGHT {
                    pending
                        .join_next()
                        .await
                        .expect("a pending transaction")??;
                }
                let mut client = client.clone();
                pending.spawn(async move { client.txn(txn).await.map(drop) });
            }
            while let Some(done) = pending.join_next().await {
                done??;
            }
            Ok(())
        })
    }

    /// etcd's current revision (that of the last write to any key).
    pub fn revision(&self) -> Result<i64> {
        let answer = self
            .rt
            .block_on(self.ds.etcd().get("/calico/.revision-probe", None))?;
        answer
            .header()
            .map(|h| h.revision())
            .ok_or_else(|| anyhow::anyhow!("etcd answered without a header"))
    }

    /// Every stored object of `kind`.
    pub fn list(&self, kind: Kind) -> Result<Vec<calico_model::Resource>> {
        Ok(self.rt.block_on(self.ds.list(kind, None))?.0)
    }

    pub fn delete(&self, kind: Kind, namespace: Option<&str>, name: &str) -> Result<()> {
        self.rt
            .block_on(self.ds.delete(kind, namespace, name, None))?;
        Ok(())
    }
}
