//! The documentation keeps up with the code: `docs/api.md` names every request and every
//! field of every reply, every relative link in README.md and docs/ resolves, and the
//! README stays short enough to read.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use ebb::api::protocol::{BalloonStatsReply, TransportErrors, VersionReply, VmRequest};
use ebb::api::protocol::{NoArgs, VmRequest as Req};
use ebb::host::config::VmEntry;
use ebb::host::protocol::{
    Event, EventKind, EventsReply, HostRequest, InspectReply, VmListing, VmsReply,
};
use ebb::host::report::{HostReport, VmReport};
use ebb::mm::stats::MemStats;
use serde_json::Value;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The verbs a request type knows, as serde lists them when it meets an unknown one.
fn verbs<R: serde::de::DeserializeOwned + std::fmt::Debug>() -> Vec<String> {
    let err = serde_json::from_str::<R>(r#"{"no-such-verb": {}}"#).unwrap_err().to_string();
    let list = err.split("expected one of").nth(1).unwrap_or_else(|| panic!("{err}"));
    let verbs: Vec<String> = list
        .split(',')
        .map(|v| v.trim().trim_matches(|c| c == '`' || c == ' ').to_owned())
        .collect();
    assert!(verbs.len() >= 5, "{err}");
    verbs.into_iter().map(|v| v.split('`').next().unwrap_or_default().to_owned()).collect()
}

/// Every key of `v`, nested objects' too.
fn keys(v: &Value, out: &mut BTreeSet<String>) {
    match v {
        Value::Object(o) => {
            for (k, v) in o {
                out.insert(k.clone());
                keys(v, out);
            }
        }
        Value::Array(a) => a.iter().for_each(|v| keys(v, out)),
        _ => {}
    }
}

#[test]
fn the_api_page_names_every_request_and_every_field() {
    let page = std::fs::read_to_string(root().join("docs/api.md")).unwrap();
    let mut missing = Vec::new();
    for verb in verbs::<VmRequest>().into_iter().chain(verbs::<HostRequest>()) {
        if !page.contains(&format!("{{\"{verb}\":")) {
            missing.push(format!("request {verb}"));
        }
    }
    let balloon = BalloonStatsReply {
        transport_errors: Some(TransportErrors::default()),
        ..BalloonStatsReply::default()
    };
    let host = HostReport { vms: vec![VmReport::default()], ..HostReport::default() };
    let entry = VmListing { name: "a".into(), pid: 1, running: true, exit: None, sock: "s".into() };
    let replies = [
        serde_json::to_value(MemStats::default()).unwrap(),
        serde_json::to_value(balloon).unwrap(),
        serde_json::to_value(host).unwrap(),
        serde_json::to_value(VmsReply { vms: vec![entry.clone()] }).unwrap(),
        serde_json::to_value(VersionReply::current()).unwrap(),
        serde_json::to_value(InspectReply {
            vm: entry.clone(),
            config: VmEntry::default(),
            report: Some(VmReport::default()),
        })
        .unwrap(),
        serde_json::to_value(EventsReply { events: every_event(), next: 0, lost: 0 }).unwrap(),
    ];
    let mut fields = BTreeSet::new();
    replies.iter().for_each(|r| keys(r, &mut fields));
    assert!(fields.len() > 100, "{fields:?}");
    for field in fields {
        if !page.contains(&format!("`{field}`")) {
            missing.push(format!("field {field}"));
        }
    }
    assert!(missing.is_empty(), "docs/api.md does not name: {missing:?}");
}

/// One event of each kind.
fn every_event() -> Vec<Event> {
    let vm = || "a".to_owned();
    let kinds = [
        EventKind::Started { vm: vm(), pid: 1 },
        EventKind::Adopted { vm: vm(), pid: 1 },
        EventKind::Ended { vm: vm(), how: "exit status 0".into() },
        EventKind::Created { vm: vm() },
        EventKind::Stopping { vm: vm() },
        EventKind::Destroyed { vm: vm() },
        EventKind::State { from: "high".into(), to: "clear".into() },
        EventKind::Budget { bytes: 1 },
        EventKind::Lever { vm: vm(), request: Req::Stats(NoArgs {}) },
    ];
    // Every kind is above: a new one fails to compile here until it is added.
    for k in &kinds {
        match k {
            EventKind::Started { .. }
            | EventKind::Adopted { .. }
            | EventKind::Ended { .. }
            | EventKind::Created { .. }
            | EventKind::Stopping { .. }
            | EventKind::Destroyed { .. }
            | EventKind::State { .. }
            | EventKind::Budget { .. }
            | EventKind::Lever { .. } => {}
        }
    }
    kinds.into_iter().map(|what| Event { seq: 1, t_ms: 0, what }).collect()
}

#[test]
fn the_api_page_names_every_event() {
    let page = std::fs::read_to_string(root().join("docs/api.md")).unwrap();
    for e in every_event() {
        let kind = serde_json::to_value(&e).unwrap()["event"].as_str().unwrap().to_owned();
        assert!(page.contains(&format!("`{kind}`")), "docs/api.md does not name event {kind}");
    }
}

/// The relative link targets of a markdown text: `](target)`, anchors and URLs left out.
fn links(text: &str) -> Vec<String> {
    text.split("](")
        .skip(1)
        .filter_map(|rest| rest.split(')').next())
        .map(|t| t.split('#').next().unwrap_or_default().trim().to_owned())
        .filter(|t| !t.is_empty() && !t.contains("://") && !t.starts_with("mailto:"))
        .collect()
}

#[test]
fn every_relative_link_in_the_readme_and_docs_resolves() {
    let mut pages = vec![root().join("README.md")];
    for e in std::fs::read_dir(root().join("docs")).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "md") {
            pages.push(p);
        }
    }
    let mut broken = Vec::new();
    for page in &pages {
        let text = std::fs::read_to_string(page).unwrap();
        let dir = page.parent().unwrap_or(Path::new("."));
        for target in links(&text) {
            if !dir.join(&target).exists() {
                broken.push(format!("{}: {target}", page.display()));
            }
        }
        // The team's notes beside the repository are not the project's: no page points there.
        let outside = ["..", "shared"].join("/");
        assert!(!text.contains(&outside), "{} points outside the project", page.display());
    }
    assert!(broken.is_empty(), "links that do not resolve: {broken:?}");
}

#[test]
fn the_readme_fits_on_a_few_screens() {
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let lines = readme.lines().count();
    assert!(lines <= 220, "README.md has {lines} lines: move reference material to docs/");
    assert!(readme.contains("scripts/ci.sh"), "the README names the test command");
}
