//! The red team's attacks on an `exec` worker, as tests. `--allow-exec` names programs, not what
//! they can do: each attack here makes an allowed program run the attacker's code (a GDAL plugin
//! loaded through `--config`, an interpreter's `-c`, a shell), then tries to read a planted
//! secret outside the data roots, write a marker there, reach the broker, read the worker's
//! environment or signal the worker. The sandbox must stop every one.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use serde_json::{Value, json};

const MINUTE: Duration = Duration::from_secs(60);
const SECRET: &str = "s3cret-canary-7f1e";

/// A scratch folder with `data/` (the worker's only data root), a secret file beside it and the
/// path of a marker that no task may create.
struct Target {
    dir: PathBuf,
    data: PathBuf,
    secret: PathBuf,
    marker: PathBuf,
}

impl Target {
    fn new(test: &str) -> Self {
        let dir = scratch(test);
        let data = dir.join("data");
        std::fs::create_dir_all(&data).unwrap();
        let secret = dir.join("secret.txt");
        std::fs::write(&secret, SECRET).unwrap();
        let marker = dir.join("pwned");
        Self {
            dir,
            data,
            secret,
            marker,
        }
    }

    /// Starts a worker confined to `data/`, allowed `programs`.
    fn worker(&self, queue: &str, programs: &[&str], extra: &[&str]) -> WorkerProcess {
        let mut args = vec!["--data-root", self.data.to_str().unwrap()];
        for program in programs {
            args.extend(["--allow-exec", program]);
        }
        args.extend_from_slice(extra);
        // The password is in the worker's environment (WARREN_AMQP_URL holds guest:guest).
        WorkerProcess::start_with(queue, &self.dir, &args, &[])
    }

    fn assert_untouched(&self, results: &BTreeMap<String, Value>) {
        assert!(
            !self.marker.exists(),
            "a payload wrote outside the data roots"
        );
        for (id, result) in results {
            let text = result.to_string();
            assert!(!text.contains(SECRET), "{id} read the secret: {text}");
        }
    }
}

/// Submits `tasks` and waits for their results, keyed by task id.
async fn run_tasks(queue: &str, dir: &Path, tasks: &[Value]) -> BTreeMap<String, Value> {
    let file = dir.join(format!("tasks-{}.jsonl", uuid::Uuid::now_v7().simple()));
    write_tasks(&file, tasks);
    let out = dir.join(format!("results-{}.jsonl", uuid::Uuid::now_v7().simple()));
    let done = submit_file(
        queue,
        &file,
        &[
            "--wait",
            "--timeout",
            "120",
            "--output",
            out.to_str().unwrap(),
        ],
    )
    .await;
    assert!(done.code.is_some(), "{}", done.stderr);
    by_task_id(read_results(
        &std::fs::read_to_string(&out).unwrap_or_default(),
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gdal_plugin_loaded_through_config_runs_but_reaches_only_the_data_roots() {
    let queue = unique_queue("gdalplugin");
    let target = Target::new("gdalplugin");
    // The attacker's plugin, written into the data root (as a task could): a constructor that
    // copies the secret to the marker, and leaves proof that it ran.
    let plugins = target.data.join("plugins");
    std::fs::create_dir_all(&plugins).unwrap();
    let source = plugins.join("evil.c");
    let ran = target.data.join("plugin-ran");
    std::fs::write(
        &source,
        format!(
            r#"#include <stdio.h>
__attribute__((constructor)) static void payload(void) {{
    FILE *proof = fopen("{ran}", "w"); if (proof) {{ fputs("ran", proof); fclose(proof); }}
    char buf[256] = {{0}};
    FILE *s = fopen("{secret}", "r"); if (s) {{ fread(buf, 1, 255, s); fclose(s); }}
    FILE *m = fopen("{marker}", "w"); if (m) {{ fputs(buf, m); fclose(m); }}
    printf("secret=[%s]\n", buf);
}}
void GDALRegisterMe(void) {{}}
"#,
            ran = ran.display(),
            secret = target.secret.display(),
            marker = target.marker.display()
        ),
    )
    .unwrap();
    let built = std::process::Command::new("cc")
        .args(["-shared", "-fPIC", "-o"])
        .arg(plugins.join("gdal_evil.so"))
        .arg(&source)
        .status()
        .expect("cc (gcc) is on this machine");
    assert!(built.success());
    let _worker = target.worker(&queue, &["gdalinfo"], &[]);
    let plugin_dir = plugins.to_str().unwrap();
    let results = run_tasks(
        &queue,
        &target.dir,
        &[json!({"id": "config", "kind": "exec", "args": {
            "argv": ["gdalinfo", "--config", "GDAL_DRIVER_PATH", plugin_dir, "--formats"],
            "cwd": target.data}})],
    )
    .await;
    assert_eq!(results.len(), 1, "{results:?}");
    // The plugin did run (an allowed program can be told to run any code)...
    assert!(ran.exists(), "the plugin was loaded: {}", results["config"]);
    // ...but inside the sandbox: no secret, no marker.
    target.assert_untouched(&results);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interpreters_and_shells_cannot_reach_secrets_the_broker_the_worker_or_other_tasks() {
    let queue = unique_queue("interp");
    let target = Target::new("interp");
    let python = "/usr/bin/python3";
    let worker = target.worker(&queue, &["sh", python], &["--concurrency", "4"]);
    worker.wait_for_log("consuming", 1, MINUTE).await;
    let pid = worker.child.id().expect("worker pid");
    let secret = target.secret.display().to_string();
    let marker = target.marker.display().to_string();
    let data = &target.data;
    let steal = format!(
        "import socket\nout=[]\n\
         for f in ['{secret}', '/proc/{pid}/environ', '/proc/{pid}/cmdline', '/proc/{pid}/mem']:\n\
         \x20   try: out.append(open(f, 'rb').read(4096).decode('latin-1'))\n\
         \x20   except Exception as e: out.append('denied ' + type(e).__name__)\n\
         try: open('{marker}', 'w').write('x'); out.append('WROTE')\n\
         except Exception as e: out.append('denied ' + type(e).__name__)\n\
         try: socket.create_connection(('127.0.0.1', 5672), timeout=3); out.append('CONNECTED')\n\
         except Exception as e: out.append('denied ' + type(e).__name__)\n\
         print(out)\n"
    );
    let results = run_tasks(
        &queue,
        &target.dir,
        &[
            json!({"id": "python", "kind": "exec", "args": {"argv": [python, "-c", steal], "cwd": data}}),
            json!({"id": "shell", "kind": "exec", "args": {"argv": ["sh", "-c",
                format!("cat {secret}; cat /proc/{pid}/environ; echo x > {marker}; kill -TERM {pid} && echo SIGNALLED")],
                "cwd": data}}),
            // Another task's private TMPDIR: one leaves a file there while the other looks.
            json!({"id": "holder", "kind": "exec", "args": {"argv": ["sh", "-c",
                "echo other-task-secret > \"$TMPDIR/mine\"; sleep 4"], "cwd": data}}),
            json!({"id": "snoop", "kind": "exec", "args": {"argv": ["sh", "-c",
                "sleep 1; cat /tmp/warren-task-tmp/*/mine; ls /tmp/warren-task-tmp"], "cwd": data}}),
            // Paths outside the roots are refused before anything looks at them.
            json!({"id": "cwd", "kind": "exec", "args": {"argv": ["sh", "-c", "true"], "cwd": "/etc"}}),
            json!({"id": "probe", "kind": "exec", "args": {"argv": ["sh", "-c", "true"], "cwd": data,
                "outputs": ["../secret.txt"]}}),
        ],
    )
    .await;
    assert_eq!(results.len(), 6, "{results:?}");
    target.assert_untouched(&results);
    let python_out = results["python"]["output"]["stdout"]
        .as_str()
        .unwrap_or_default();
    assert!(
        !python_out.contains("CONNECTED"),
        "reached the broker: {python_out}"
    );
    assert!(!python_out.contains("WROTE"), "{python_out}");
    assert!(
        !python_out.contains("guest"),
        "read the worker's settings: {python_out}"
    );
    assert_eq!(python_out.matches("denied").count(), 6, "{python_out}");
    let shell = &results["shell"]["output"];
    assert!(
        !shell["stdout"]
            .as_str()
            .unwrap_or_default()
            .contains("SIGNALLED"),
        "{shell}"
    );
    assert!(
        !results["snoop"].to_string().contains("other-task-secret"),
        "{}",
        results["snoop"]
    );
    for id in ["cwd", "probe"] {
        assert_eq!(results[id]["status"], "rejected", "{}", results[id]);
        assert_eq!(results[id]["error"]["kind"], "path_not_allowed");
    }
    // The worker lived through it all, and its TMPDIRs are gone.
    assert!(worker.log_text().contains("task finished task_id=snoop"));
    let left: Vec<_> = std::fs::read_dir("/tmp/warren-task-tmp")
        .map(|d| d.filter_map(Result::ok).map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(
        !left
            .iter()
            .any(|p| std::fs::read_to_string(p.join("mine")).is_ok()),
        "a task's TMPDIR was left behind: {left:?}"
    );
    // The port can be opened to tasks on purpose.
    let open_queue = unique_queue("interpnet");
    let _open = target.worker(&open_queue, &[python], &["--sandbox-net-allow", "5672"]);
    let results = run_tasks(
        &open_queue,
        &target.dir,
        &[json!({"id": "net", "kind": "exec", "args": {"argv": [python, "-c",
            "import socket; socket.create_connection(('127.0.0.1', 5672), timeout=3); print('CONNECTED')"],
            "cwd": data}})],
    )
    .await;
    assert_eq!(
        results["net"]["output"]["stdout"], "CONNECTED\n",
        "{}",
        results["net"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn variables_that_load_code_or_configuration_are_refused() {
    let queue = unique_queue("envattack");
    let target = Target::new("envattack");
    let _worker = target.worker(&queue, &["gdalinfo", "git", "sh"], &[]);
    let d = target.data.to_str().unwrap();
    let attacks = [
        ("GDAL_CONFIG_FILE", format!("{d}/gdalrc")),
        ("GDAL_VRT_ENABLE_PYTHON", "YES".to_string()),
        ("OPENSSL_CONF", format!("{d}/openssl.cnf")),
        ("OPENSSL_MODULES", d.to_string()),
        ("XDG_CONFIG_HOME", d.to_string()),
        ("LANGUAGE", "../../../../tmp/x".to_string()),
        ("GLIBC_TUNABLES", "glibc.malloc.check=3".to_string()),
        ("TZ", format!("{d}/zone")),
        ("PYENV_HOOK_PATH", d.to_string()),
    ];
    let tasks: Vec<Value> = attacks
        .iter()
        .map(|(name, value)| {
            json!({"id": name, "kind": "exec", "args": {"argv": ["sh", "-c", "true"], "env": {*name: value}, "cwd": d}})
        })
        .chain([
            json!({"id": "allowed", "kind": "exec", "args": {"argv": ["sh", "-c", "echo $GDAL_CACHEMAX $LC_ALL"],
                "env": {"GDAL_CACHEMAX": "512", "LC_ALL": "C.UTF-8"}, "cwd": d}}),
        ])
        .collect();
    let results = run_tasks(&queue, &target.dir, &tasks).await;
    assert_eq!(results.len(), attacks.len() + 1, "{results:?}");
    for (name, _) in attacks {
        assert_eq!(
            results[name]["status"], "rejected",
            "{name}: {}",
            results[name]
        );
        assert_eq!(results[name]["error"]["kind"], "env_not_allowed", "{name}");
    }
    assert_eq!(results["allowed"]["output"]["stdout"], "512 C.UTF-8\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_refuses_to_start_with_its_password_file_inside_a_sandbox_root() {
    let target = Target::new("pwinroot");
    let password = target.data.join("amqp-password");
    std::fs::write(&password, "guest").unwrap();
    let refused = run_warren(
        &[
            "worker",
            "--queue",
            &unique_queue("pwinroot"),
            "--allow-exec",
            "sh",
            "--data-root",
            target.data.to_str().unwrap(),
            "--amqp-password-file",
            password.to_str().unwrap(),
        ],
        None,
        MINUTE,
    )
    .await;
    assert_eq!(refused.code, Some(2), "{}", refused.stderr);
    assert!(
        refused.stderr.contains("credentials") && refused.stderr.contains("amqp-password"),
        "{}",
        refused.stderr
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_embedded_in_an_inline_vrt_runs_but_reaches_only_the_data_roots() {
    let queue = unique_queue("vrtpython");
    let target = Target::new("vrtpython");
    let ran = target.data.join("vrt-ran");
    // Nothing on disk: the whole dataset, Python included, is in the task's arguments.
    let vrt = format!(
        r#"<VRTDataset rasterXSize="1" rasterYSize="1">
  <VRTRasterBand dataType="Byte" band="1" subClass="VRTDerivedRasterBand">
    <PixelFunctionType>evil</PixelFunctionType>
    <PixelFunctionLanguage>Python</PixelFunctionLanguage>
    <PixelFunctionCode><![CDATA[
def evil(in_ar, out_ar, xoff, yoff, xsize, ysize, raster_xsize, raster_ysize, buf_radius, gt, **kwargs):
    open('{ran}', 'w').write('ran')
    try:
        stolen = open('{secret}').read()
        open('{marker}', 'w').write(stolen)
        print('secret=' + stolen)
    except Exception as e:
        print('denied', type(e).__name__)
    out_ar[:] = 0
]]></PixelFunctionCode>
  </VRTRasterBand>
</VRTDataset>"#,
        ran = ran.display(),
        secret = target.secret.display(),
        marker = target.marker.display()
    );
    let _worker = target.worker(&queue, &["gdalinfo"], &[]);
    let results = run_tasks(
        &queue,
        &target.dir,
        &[json!({"id": "vrt", "kind": "exec", "args": {
            "argv": ["gdalinfo", "--config", "GDAL_VRT_ENABLE_PYTHON", "YES", "-checksum", vrt],
            "cwd": target.data}})],
    )
    .await;
    assert_eq!(results.len(), 1, "{results:?}");
    assert!(ran.exists(), "the embedded Python ran: {}", results["vrt"]);
    target.assert_untouched(&results);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_may_ask_for_less_than_the_workers_limits_never_more() {
    let queue = unique_queue("limits");
    let target = Target::new("limits");
    let _worker = target.worker(
        &queue,
        &["sh"],
        &["--limit-file-size", "1000000", "--limit-open-files", "256"],
    );
    let d = &target.data;
    let results = run_tasks(
        &queue,
        &target.dir,
        &[
            // Within the worker's cap: a 2 KB file is too big for a 1 KB limit.
            json!({"id": "small-files", "kind": "exec", "args": {"argv": ["sh", "-c",
                "head -c 2000 /dev/zero > big; echo wrote"], "cwd": d, "limits": {"file_bytes": 1000}}}),
            json!({"id": "open-files", "kind": "exec", "args": {"argv": ["sh", "-c", "ulimit -n"],
                "cwd": d, "limits": {"open_files": 64}}}),
            // The worker's caps apply when a task asks for nothing.
            json!({"id": "defaults", "kind": "exec", "args": {"argv": ["sh", "-c", "ulimit -n; ulimit -f"], "cwd": d}}),
            // More than the cap is refused, naming it.
            json!({"id": "greedy", "kind": "exec", "args": {"argv": ["sh", "-c", "true"], "cwd": d,
                "limits": {"file_bytes": 5000000}}}),
        ],
    )
    .await;
    assert_eq!(results.len(), 4, "{results:?}");
    let size = std::fs::metadata(target.data.join("big"))
        .map(|m| m.len())
        .unwrap_or(0);
    assert!(size <= 1000, "the task's own file limit held: {size} bytes");
    assert_eq!(results["open-files"]["output"]["stdout"], "64\n");
    // `ulimit -f` counts 512-byte blocks.
    assert_eq!(
        results["defaults"]["output"]["stdout"], "256\n1953\n",
        "{}",
        results["defaults"]
    );
    assert_eq!(
        results["greedy"]["status"], "rejected",
        "{}",
        results["greedy"]
    );
    let message = results["greedy"]["error"]["message"]
        .as_str()
        .unwrap_or_default();
    assert!(message.contains("--limit-file-size"), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_output_turned_into_a_symlink_does_not_describe_a_file_outside_the_roots() {
    let queue = unique_queue("outputlink");
    let target = Target::new("outputlink");
    let _worker = target.worker(&queue, &["ln"], &[]);
    let secret = target.secret.display().to_string();
    let results = run_tasks(
        &queue,
        &target.dir,
        &[json!({"id": "link", "kind": "exec", "args": {
            "argv": ["ln", "-s", secret, "out"], "cwd": target.data, "outputs": ["out"]}})],
    )
    .await;
    let link = &results["link"];
    assert_eq!(link["error"]["kind"], "missing_outputs", "{link}");
    assert!(
        link["output"]["outputs"]
            .as_array()
            .is_some_and(Vec::is_empty),
        "the secret's size is not reported: {link}"
    );
}
