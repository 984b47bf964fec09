//! Slow disk work never stalls the API: while DeleteVm removes VM
//! directories that take long to remove, other requests are answered.

use std::path::{Path, PathBuf};

use serde_json::json;

use crate::harness::{Assets, Daemon, connect_json, vm_key};

const T: &str = "dev_customer_blocking";

/// Files put in each deleted VM's directory: enough that removing them
/// takes seconds.
const FILES: usize = 50_000;

fn entries(dir: &Path) -> usize {
    std::fs::read_dir(dir).map(|d| d.count()).unwrap_or(0)
}

/// As many deletes as metald has async workers (one per CPU) remove large
/// directories at once. Were the removals done on the workers, every
/// worker would be inside one, and GetVmInfo of another VM could not be
/// answered until a removal ended: so the answer must come while both
/// directories are still there. Only the order of events is checked.
#[tokio::test(flavor = "multi_thread")]
async fn get_vm_info_answers_while_deletes_remove_large_vm_directories() {
    let assets = Assets::load();
    let d = Daemon::start();
    d.ok(
        T,
        "CreateVm",
        json!({"vm_id": "other", "config": assets.config()}),
    )
    .await;
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get());
    let mut junk: Vec<(String, PathBuf)> = Vec::new();
    for i in 0..workers {
        let id = format!("heavy-{i}");
        d.ok(
            T,
            "CreateVm",
            json!({"vm_id": id, "config": assets.config()}),
        )
        .await;
        let dir = d
            .data_dir
            .join("vms")
            .join(vm_key(&d, T, &id).await)
            .join("junk");
        std::fs::create_dir_all(&dir).unwrap();
        for f in 0..FILES {
            std::fs::write(dir.join(f.to_string()), b"x").unwrap();
        }
        junk.push((id, dir));
    }
    let deletes: Vec<_> = junk
        .iter()
        .map(|(id, _)| {
            let (url, id) = (d.url.clone(), id.clone());
            tokio::spawn(
                async move { connect_json(&url, T, "DeleteVm", json!({"vm_id": id})).await },
            )
        })
        .collect();
    // Every removal under way: each directory has begun to shrink.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while !junk.iter().all(|(_, dir)| entries(dir) < FILES) {
        assert!(
            std::time::Instant::now() < deadline,
            "the deletes never began removing"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    connect_json(&d.url, T, "GetVmInfo", json!({"vm_id": "other"}))
        .await
        .expect("GetVmInfo answers");
    let left: Vec<usize> = junk.iter().map(|(_, dir)| entries(dir)).collect();
    assert!(
        left.iter().all(|n| *n > 0),
        "GetVmInfo was answered only after a removal ended: {left:?} entries left"
    );
    for t in deletes {
        t.await.unwrap().expect("delete");
    }
    for (id, dir) in &junk {
        assert!(!dir.exists(), "{id}'s files are gone");
        let e = d
            .call(T, "GetVmInfo", json!({"vm_id": id}))
            .await
            .unwrap_err();
        assert_eq!(e.0, "not_found");
    }
}
