//! ListVms: stable order, opaque page tokens, totals, state filter.

use std::collections::HashSet;

use serde_json::{Value, json};

use crate::harness::{Assets, Daemon};

fn ids(v: &Value) -> Vec<String> {
    v["vms"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|x| x["vmId"].as_str().unwrap().to_owned())
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread")]
async fn paginates_120_vms_into_3_pages_without_gaps_or_duplicates() {
    let assets = Assets::load();
    let d = Daemon::start();
    let t = "dev_customer_pages";
    let mut created = Vec::new();
    for i in 0..120 {
        let v = d
            .ok(
                t,
                "CreateVm",
                json!({"vm_id": format!("page-{i:03}"), "config": assets.config()}),
            )
            .await;
        created.push(v["vmId"].as_str().unwrap().to_owned());
    }
    // Another customer's VMs must not appear or count.
    d.ok(
        "dev_customer_other",
        "CreateVm",
        json!({"config": assets.config()}),
    )
    .await;

    let mut seen = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = d
            .ok(t, "ListVms", json!({"page_size": 50, "page_token": token}))
            .await;
        pages += 1;
        assert_eq!(page["totalCount"], 120, "total on page {pages}");
        let got = ids(&page);
        assert_eq!(
            got.len(),
            if pages < 3 { 50 } else { 20 },
            "page {pages} size"
        );
        seen.extend(got);
        token = page["nextPageToken"].as_str().unwrap_or("").to_owned();
        if token.is_empty() {
            break;
        }
        assert!(pages < 10, "pagination does not end");
    }
    assert_eq!(pages, 3);
    assert_eq!(seen, created, "every VM once, in creation order");
    assert_eq!(seen.iter().collect::<HashSet<_>>().len(), 120);

    // A client that accepts gzip gets small answers as they are (they
    // are not worth metald's CPU) and large ones compressed.
    let encoding = |page_size: u32| {
        let url = format!("{}/vmprovisioner.v1.VmService/ListVms", d.url);
        async move {
            let r = reqwest::Client::new()
                .post(url)
                .bearer_auth(t)
                .header("content-type", "application/json")
                .header("accept-encoding", "gzip")
                .body(json!({"page_size": page_size}).to_string())
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            let enc = r
                .headers()
                .get("content-encoding")
                .map(|v| v.to_str().unwrap().to_owned());
            (enc, r.bytes().await.unwrap().len())
        }
    };
    let (small, small_len) = encoding(50).await;
    assert_eq!(
        small, None,
        "a page of 50 ({small_len} bytes) is not compressed"
    );
    let (large, large_len) = encoding(1000).await;
    assert_eq!(
        large.as_deref(),
        Some("gzip"),
        "a page of 120 ({large_len} bytes on the wire) is compressed"
    );

    // Default page size is 50; oversized requests are reduced to 1000.
    assert_eq!(ids(&d.ok(t, "ListVms", json!({})).await).len(), 50);
    assert_eq!(
        ids(&d.ok(t, "ListVms", json!({"page_size": 5000})).await).len(),
        120
    );

    // State filter: boot one; RUNNING finds exactly it, CREATED the rest.
    d.ok(t, "BootVm", json!({"vm_id": "page-007"})).await;
    let running = d
        .ok(t, "ListVms", json!({"state_filter": ["VM_STATE_RUNNING"]}))
        .await;
    assert_eq!(ids(&running), vec!["page-007".to_owned()]);
    assert_eq!(running["totalCount"], 1);
    let created_only = d
        .ok(
            t,
            "ListVms",
            json!({"state_filter": ["VM_STATE_CREATED"], "page_size": 1000}),
        )
        .await;
    assert_eq!(created_only["totalCount"], 119);
    assert!(!ids(&created_only).contains(&"page-007".to_owned()));
    let both = d
        .ok(
            t,
            "ListVms",
            json!({"state_filter": ["VM_STATE_CREATED", "VM_STATE_RUNNING"]}),
        )
        .await;
    assert_eq!(both["totalCount"], 120);
    d.ok(t, "DeleteVm", json!({"vm_id": "page-007", "force": true}))
        .await;
}
