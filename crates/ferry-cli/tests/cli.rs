//! End-to-end tests of the real `ferry` binary: exit codes, stdout and stderr.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../../shared/fixtures/specforge-control");

fn fixture(name: &str) -> PathBuf {
    Path::new(FIXTURES).join(name)
}

/// Runs `ferry` with `args` (default log filter, so warnings show), feeding `stdin`.
fn ferry_with_stdin(args: &[&str], stdin: &[u8]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(args)
        .env_remove("RUST_LOG")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("ferry starts");
    child.stdin.take().expect("stdin is piped").write_all(stdin).expect("stdin accepts input");
    child.wait_with_output().expect("ferry runs")
}

fn ferry(args: &[&str]) -> Output {
    ferry_with_stdin(args, b"")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8(bytes.to_vec()).expect("output is UTF-8")
}

/// stdout of a run that must succeed.
fn success(args: &[&str]) -> (String, String) {
    let out = ferry(args);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(out.status.code(), Some(0), "ferry {args:?} failed\nstdout:\n{stdout}\nstderr:\n{stderr}");
    (stdout, stderr)
}

/// The complete lines of a JSON-lines file (the torn tail, if any, left out).
fn complete_lines(path: &Path) -> Vec<String> {
    let content = std::fs::read_to_string(path).expect("fixture is readable");
    let mut lines: Vec<String> = content.split('\n').map(str::to_owned).collect();
    lines.pop(); // after the last newline: empty, or the torn record
    lines
}

#[test]
fn demo_small_runs_both_stores_and_leaves_them_empty() {
    let (stdout, _) = success(&["demo", "--topology", "stores", "--samples", "2", "--seq-len", "64", "--hidden", "32"]);
    assert_eq!(stdout.matches("resident_bytes=0 ").count(), 2, "{stdout}");
    for store in ["mem://demo", "dir://", "example ref", "put GB/s", "get/memcpy", "checksums match"] {
        assert!(stdout.contains(store), "missing {store:?} in\n{stdout}");
    }
    let rows = |backend: &str| stdout.lines().filter(|l| l.starts_with(backend)).count();
    assert_eq!(rows("memory "), 2, "{stdout}"); // two rounds
    assert_eq!(rows("shared_dir "), 2, "{stdout}");
    // 64 tokens of (8 * 32 + 24) bytes.
    assert!(stdout.contains(&format!("{:.2}", 64.0 * 280.0 / 1048576.0)), "{stdout}");
}

#[test]
fn demo_in_a_given_directory_removes_every_sample_file() {
    let root = tempfile::tempdir().expect("tempdir");
    let root_arg = root.path().to_str().expect("UTF-8 temp path");
    let (stdout, _) = success(&[
        "demo",
        "--topology",
        "stores",
        "--store",
        "dir",
        "--samples",
        "3",
        "--seq-len",
        "16",
        "--hidden",
        "8",
        "--dir",
        root_arg,
    ]);
    assert!(!stdout.contains("mem://"), "{stdout}");
    let left: Vec<String> = std::fs::read_dir(root.path().join("demo"))
        .expect("store directory exists")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .filter(|n| n != ".ferry-generation")
        .collect();
    assert!(left.is_empty(), "consume-once left files: {left:?}");
}

#[test]
fn demo_rejects_dir_without_a_dir_store() {
    let out = ferry(&["demo", "--topology", "stores", "--store", "mem", "--dir", "/tmp/x"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("--dir"), "{}", text(&out.stderr));
}

#[test]
fn bench_store_reports_the_ratio() {
    for store in ["mem", "dir"] {
        let (stdout, _) = success(&["bench", "store", "--size-mib", "1", "--iters", "2", "--store", store]);
        assert!(stdout.contains("ratio memcpy_time/store_time for 1 MiB: "), "{stdout}");
        assert!(stdout.contains("memcpy x2"), "{stdout}");
    }
}

#[test]
fn inspect_channel_summarises_four_refs_and_warns_about_the_torn_tail() {
    let path = fixture("refs.jsonl");
    let (stdout, stderr) = success(&["inspect", path.to_str().expect("UTF-8 path")]);
    let summaries: Vec<&str> = stdout.lines().filter(|l| l.starts_with("line ")).collect();
    assert_eq!(summaries.len(), 4, "{stdout}");
    assert!(
        summaries[0].starts_with("line 1: run0:task0 generation=1 disagg://fixture/run0:task0 eagle3 ["),
        "{stdout}"
    );
    assert!(summaries[0].contains("hidden_state (1, 4, 24) bfloat16"), "{stdout}");
    assert!(summaries[0].ends_with("320 B"), "{stdout}");
    assert!(stdout.contains("4 refs (3 distinct sample ids) in JSON lines"), "{stdout}");
    assert!(stderr.contains("line 5") && stderr.contains("torn"), "{stderr}");
}

#[test]
fn inspect_json_reproduces_each_complete_channel_line_byte_for_byte() {
    let path = fixture("refs.jsonl");
    let (stdout, _) = success(&["inspect", "--json", path.to_str().expect("UTF-8 path")]);
    let expected = complete_lines(&path);
    assert_eq!(expected.len(), 4);
    let got: Vec<&str> = stdout.lines().collect();
    assert_eq!(got, expected);
}

#[test]
fn inspect_manifest_spaced_reproduces_each_ref() {
    let path = fixture("manifest.json");
    let (stdout, _) = success(&["inspect", "--json", "--spaced", path.to_str().expect("UTF-8 path")]);
    let manifest = std::fs::read_to_string(&path).expect("fixture is readable");
    // SpecForge writes json.dumps({"schema_version": 1, "refs": [...]}): rebuild it from our lines.
    let rebuilt = format!("{{\"schema_version\": 1, \"refs\": [{}]}}", stdout.lines().collect::<Vec<_>>().join(", "));
    assert_eq!(rebuilt, manifest.trim_end());
    assert!(stdout.lines().count() >= 2);

    let (summary, _) = success(&["inspect", path.to_str().expect("UTF-8 path")]);
    assert!(summary.contains("in manifest (schema_version 1)"), "{summary}");
    assert!(summary.lines().any(|l| l.starts_with("refs[0]: ")), "{summary}");
}

#[test]
fn inspect_reads_stdin_and_converts_spacing() {
    let path = fixture("refs.jsonl");
    let first = complete_lines(&path).remove(0);
    let out = ferry_with_stdin(&["inspect", "--json", "--spaced", "-"], format!("\n{first}\n").as_bytes());
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let spaced = text(&out.stdout);
    assert!(spaced.starts_with(r#"{"sample_id": "run0:task0", "run_id": "run0", "#), "{spaced}");
    // And back: spaced input, compact output, equal to the original line.
    let out = ferry_with_stdin(&["inspect", "--json", "-"], spaced.as_bytes());
    assert_eq!(text(&out.stdout), format!("{first}\n"));
}

#[test]
fn inspect_rejects_an_unknown_key_naming_it_and_the_line() {
    let path = fixture("refs.jsonl");
    let lines = complete_lines(&path);
    let bad = lines[1].replacen("\"run_id\":", "\"bogus_key\":7,\"run_id\":", 1);
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("bad.jsonl");
    std::fs::write(&file, format!("{}\n{bad}\n", lines[0])).expect("write");
    let out = ferry(&["inspect", file.to_str().expect("UTF-8 path")]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("line 2"), "{stderr}");
    assert!(stderr.contains("bogus_key"), "{stderr}");
    assert!(out.stdout.is_empty(), "nothing is printed before the input is valid");
}

#[test]
fn inspect_of_a_missing_file_fails_with_its_name() {
    let out = ferry(&["inspect", "/nonexistent/refs.jsonl"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(stderr.contains("/nonexistent/refs.jsonl"), "{stderr}");
}

#[test]
fn spaced_without_json_is_a_usage_error() {
    let out = ferry(&["inspect", "--spaced", "x"]);
    assert_eq!(out.status.code(), Some(2));
}

/// A path under the fixtures root (the folder above `specforge-control`).
fn any_fixture(rel: &str) -> PathBuf {
    Path::new(FIXTURES).parent().expect("fixtures root").join(rel)
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn inspect_tensor_file_json_matches_the_expected_twin() {
    for rel in [
        "specforge-offline-eagle3/rows_0-2/data_0.ckpt",
        "specforge-offline-eagle3/rows_2-4/data_2.ckpt.gz",
        "torch-zip-edge/strided_view.ckpt",
    ] {
        let path = any_fixture(rel);
        let (stdout, _) = success(&["inspect", "--json", path.to_str().expect("UTF-8 path")]);
        let value: serde_json::Value = serde_json::from_str(stdout.trim()).expect("one JSON object");
        let twin = ferry_format::TensorFile::open(&any_fixture(&format!("expected/{rel}.safetensors"))).expect("twin");
        let object = value.as_object().expect("an object");
        assert_eq!(object.len(), twin.len(), "{rel}");
        for (name, entry) in object {
            let want = twin.tensor(name).expect("tensor in twin");
            let view = want.view();
            assert_eq!(entry["dtype"], view.dtype().name(), "{rel} {name}");
            assert_eq!(entry["shape"], serde_json::json!(view.shape()), "{rel} {name}");
            assert_eq!(entry["nbytes"], view.nbytes(), "{rel} {name}");
            assert_eq!(entry["sha256"], sha256_hex(view.bytes()), "{rel} {name}");
        }
    }
    let (summary, _) = success(&["inspect", any_fixture("torch-zip-edge/dtypes.ckpt").to_str().expect("UTF-8 path")]);
    assert!(summary.contains("bfloat16") && summary.contains("tensors"), "{summary}");
}

#[test]
fn ingest_publishes_a_manifest_that_inspect_reads() {
    let root = tempfile::tempdir().expect("tempdir");
    let store = format!("dir://{}", root.path().join("store").display());
    let manifest = root.path().join("control/manifest.json");
    let input = any_fixture("specforge-offline-eagle3");
    let args =
        ["ingest", input.to_str().expect("UTF-8"), "--store", &store, "--manifest", manifest.to_str().expect("UTF-8")];
    let (stdout, _) = success(&args);
    assert!(stdout.contains("ingested 4 files"), "{stdout}");
    assert!(PathBuf::from(format!("{}.done", manifest.display())).exists());
    let (listing, _) = success(&["inspect", manifest.to_str().expect("UTF-8")]);
    assert!(listing.contains("disagg:00000003") && listing.contains("4 refs"), "{listing}");
    let again = ferry(&args);
    assert_eq!(again.status.code(), Some(1));
    assert!(text(&again.stderr).contains("existing attempt"), "{}", text(&again.stderr));
    let mem =
        ferry(&["ingest", input.to_str().expect("UTF-8"), "--store", "mem://x", "--manifest", "/tmp/unused.json"]);
    assert_eq!(mem.status.code(), Some(1));
    assert!(text(&mem.stderr).contains("use dir://"), "{}", text(&mem.stderr));
    let bad = ferry(&[
        "ingest",
        input.to_str().expect("UTF-8"),
        "--store",
        &store,
        "--manifest",
        "/tmp/x.json",
        "--strategy",
        "nope",
    ]);
    assert!(text(&bad.stderr).contains("nope"), "{}", text(&bad.stderr));
}

#[test]
fn inspect_reads_pt_and_pth_files_as_tensor_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    let source = any_fixture("specforge-offline-eagle3/rows_0-2/data_0.ckpt");
    for name in ["x.pt", "x.pth"] {
        let path = dir.path().join(name);
        std::fs::copy(&source, &path).expect("copy");
        let (stdout, _) = success(&["inspect", "--json", path.to_str().expect("UTF-8 path")]);
        let value: serde_json::Value = serde_json::from_str(stdout.trim()).expect("one JSON object");
        assert!(value["input_ids"]["sha256"].is_string(), "{name}: {stdout}");
    }
}

#[test]
fn ingest_says_failed_records_the_reason_only_when_this_attempt_wrote_it() {
    let root = tempfile::tempdir().expect("tempdir");
    let store = format!("dir://{}", root.path().join("store").display());
    let manifest = root.path().join("control/manifest.json");
    let failed = PathBuf::from(format!("{}.failed", manifest.display()));
    // A DFlash folder ingested as EAGLE3: the attempt fails, writes .failed, and names the fix.
    let input = any_fixture("specforge-offline-dflash");
    let args =
        ["ingest", input.to_str().expect("UTF-8"), "--store", &store, "--manifest", manifest.to_str().expect("UTF-8")];
    let out = ferry(&args);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains(&format!("{} records the reason", failed.display())), "{stderr}");
    assert!(stderr.contains("missing required offline feature keys ['hidden_state', 'aux_hidden_state']"), "{stderr}");
    assert!(!stderr.contains("is not available"), "{stderr}");
    assert!(stderr.contains("--strategy dflash"), "{stderr}");
    let reason = std::fs::read_to_string(&failed).expect(".failed written");
    assert!(reason.starts_with("KeyError: "), "{reason}");
    // A second attempt on the same manifest is refused: the .failed is not its own.
    let again = ferry(&args);
    let stderr = text(&again.stderr);
    assert_eq!(again.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("existing attempt"), "{stderr}");
    assert!(!stderr.contains("records the reason"), "{stderr}");
    assert_eq!(std::fs::read_to_string(&failed).expect(".failed kept"), reason);
}

#[test]
fn ingest_of_an_empty_folder_fails_before_claiming() {
    let root = tempfile::tempdir().expect("tempdir");
    let input = root.path().join("empty");
    std::fs::create_dir(&input).expect("mkdir");
    let store = format!("dir://{}", root.path().join("store").display());
    let manifest = root.path().join("control/manifest.json");
    let out = ferry(&[
        "ingest",
        input.to_str().expect("UTF-8"),
        "--store",
        &store,
        "--manifest",
        manifest.to_str().expect("UTF-8"),
    ]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains(input.to_str().expect("UTF-8")) && stderr.contains(".safetensors"), "{stderr}");
    assert!(!stderr.contains("records the reason"), "{stderr}");
    assert!(!PathBuf::from(format!("{}.producer_claim", manifest.display())).exists());
    assert!(!PathBuf::from(format!("{}.done", manifest.display())).exists());
}

/// A `ferry serve` process, killed if the test fails before it stops it.
struct Served {
    child: std::process::Child,
    stdout: std::io::BufReader<std::process::ChildStdout>,
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Served {
    fn start(args: &[&str]) -> Served {
        let mut child = Command::new(env!("CARGO_BIN_EXE_ferry"))
            .arg("serve")
            .args(args)
            .env_remove("FERRY_AUTH_TOKEN")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("ferry serve starts");
        let stdout = std::io::BufReader::new(child.stdout.take().expect("stdout is piped"));
        let mut served = Served { child, stdout };
        served.read_until("ready");
        served
    }

    /// Lines up to and including the first that contains `want` (a closed stdout fails).
    fn read_until(&mut self, want: &str) -> String {
        use std::io::BufRead;
        let mut seen = String::new();
        loop {
            let mut line = String::new();
            assert!(self.stdout.read_line(&mut line).expect("reading ferry serve") > 0, "no {want:?} in:\n{seen}");
            seen.push_str(&line);
            if line.contains(want) {
                return seen;
            }
        }
    }

    fn sigterm_and_wait(&mut self) -> (std::process::ExitStatus, String) {
        let pid = self.child.id().to_string();
        assert!(Command::new("kill").args(["-TERM", &pid]).status().expect("kill runs").success());
        let report = self.read_until("stopped:");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().expect("waiting for ferry serve") {
                return (status, report);
            }
            assert!(std::time::Instant::now() < deadline, "ferry serve did not exit after SIGTERM");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }
}

#[test]
fn serve_answers_status_with_a_secret_and_stops_cleanly_on_sigterm() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("ferry.sock");
    let secret = dir.path().join("secret");
    std::fs::write(&secret, "s3cret\n").expect("writing the secret");
    let (socket_s, secret_s) = (socket.to_str().expect("utf-8"), secret.to_str().expect("utf-8"));
    let mut served = Served::start(&[
        "--socket",
        socket_s,
        "--listen",
        "127.0.0.1:0",
        "--capacity",
        "32MiB",
        "--store-id",
        "node0",
        "--secret-file",
        secret_s,
    ]);
    let uri = format!("ferry+unix://{socket_s}");
    let (stdout, _) = success(&["status", &uri, "--secret-file", secret_s, "--json"]);
    let health: serde_json::Value = serde_json::from_str(stdout.trim()).expect("status --json is one object");
    assert_eq!(health["store_id"], "node0");
    assert_eq!(health["backend"], "arena");
    assert_eq!(health["max_resident_bytes"], 32 << 20);
    assert_eq!(health["auth_required"], true);
    // Without the secret: a clear error, exit 1.
    let out = ferry(&["status", &uri]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("requires a shared secret"), "{}", text(&out.stderr));
    let (status, report) = served.sigterm_and_wait();
    assert!(status.success(), "{status}\n{report}");
    assert!(report.contains("stopped: 0 sample(s)"), "{report}");
    assert!(!socket.exists(), "the socket file is removed on stop");
}

#[test]
fn serve_needs_somewhere_to_listen_and_a_sane_capacity() {
    let out = ferry(&["serve"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("--listen"), "{}", text(&out.stderr));
    let out = ferry(&["serve", "--socket", "/tmp/x.sock", "--capacity", "lots"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("not a size like 64MiB"), "{}", text(&out.stderr));
}

#[test]
fn bench_transfer_json_has_the_fields_scripts_rely_on() {
    for route in ["shm", "tcp"] {
        let (stdout, _) = success(&["bench", "transfer", "--size", "1MiB", "--iters", "2", "--route", route, "--json"]);
        let v: serde_json::Value = serde_json::from_str(stdout.trim()).expect("one JSON object");
        assert_eq!(v["route"], route);
        assert_eq!(v["served_route"], route);
        assert_eq!(v["size"], 1 << 20);
        for key in [
            "put_gbps",
            "get_gbps",
            "memcpy_gbps",
            "tcp_raw_gbps",
            "memcpy_into_shm_gbps",
            "memcpy_from_shm_gbps",
            "get_4k_p50_us",
        ] {
            assert!(v[key].as_f64().is_some_and(|x| x > 0.0), "{key} in {v}");
        }
    }
}

#[test]
fn bench_view_fetches_each_shard_both_ways_with_equal_bytes() {
    // The benchmark itself checks that both ways give the shard's bytes (it fails otherwise).
    let (stdout, _) = success(&["bench", "view", "--size", "1MiB", "--shards", "4", "--iters", "1", "--json"]);
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).expect("one JSON object");
    let (rows, cols) = (v["weight_shape"][0].as_u64().unwrap(), v["weight_shape"][1].as_u64().unwrap());
    assert_eq!((rows % 4, cols % 4, v["shard_bytes"].as_u64()), (0, 0, Some(rows * cols * 2 / 4)), "{v}");
    let got: Vec<(String, u64, u64)> = v["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["route"].as_str().unwrap().to_owned(), r["dim"].as_u64().unwrap(), r["ranges"].as_u64().unwrap()))
        .collect();
    let want = [("shm", 0, 1), ("shm", 1, rows), ("tcp", 0, 1), ("tcp", 1, rows)];
    assert_eq!(got, want.map(|(r, d, n)| (r.to_owned(), d, n)), "{v}");
    for row in v["rows"].as_array().unwrap() {
        assert!(row["view_ms"].as_f64().is_some_and(|x| x > 0.0) && row["speedup"].as_f64().is_some(), "{row}");
    }
    let out = ferry(&["bench", "view", "--shards", "0"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
}

#[test]
fn bench_control_json_has_the_fields_scripts_rely_on() {
    let (stdout, _) =
        success(&["bench", "control", "--refs", "200", "--dp", "2", "--batch", "2", "--accumulation", "2", "--json"]);
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).expect("one JSON object");
    assert_eq!(v["refs"], 200);
    assert_eq!(v["dp"], 2);
    // 200 refs in windows of 8: 25 optimizer steps, nothing dropped.
    assert_eq!((v["optimizer_steps"].as_u64(), v["dropped"].as_u64()), (Some(25), Some(0)));
    assert!(v["refs_per_s"].as_f64().is_some_and(|x| x > 0.0), "{v}");
    let out = ferry(&["bench", "control", "--refs", "3", "--dp", "2"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("less than one optimizer window"), "{}", text(&out.stderr));
}

#[test]
fn the_online_demo_checks_exactly_once_and_prints_the_json_scripts_rely_on() {
    let (stdout, _) = success(&["demo", "--samples", "16", "--seq-len", "32", "--hidden", "32", "--json"]);
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).expect("one JSON object");
    assert_eq!((v["samples_published"].as_u64(), v["samples_trained"].as_u64()), (Some(16), Some(16)));
    assert_eq!(v["trained_exactly_once"], true);
    assert_eq!(v["checksums_match_colocated"], true);
    assert_eq!((v["resident_bytes_after"].as_u64(), v["pending_removals_after"].as_u64()), (Some(0), Some(0)));
    for key in ["gbps", "memcpy_gbps"] {
        assert!(v[key].as_f64().is_some_and(|x| x > 0.0), "{key} in {v}");
    }
    let (text, _) = success(&["demo", "--samples", "8", "--seq-len", "16", "--hidden", "16"]);
    assert!(text.contains("every sample trained exactly once ........ ok"), "{text}");
}
