//! Loading through the public entry points: layering, origins, errors, rendering, docs.

use std::io::Write;
use std::path::{Path, PathBuf};

use clap::{CommandFactory, Parser};
use tempfile::NamedTempFile;

use crate::keys::{env_var, KEYS};
use crate::*;

/// A stand-in for the node's parser, embedding the flags the way the binary will.
#[derive(Parser, Debug)]
struct Cli {
    #[command(flatten)]
    config: ConfigArgs,
}

fn cli(flags: &[&str]) -> ConfigArgs {
    let argv = std::iter::once("pegaflow-node").chain(flags.iter().copied());
    Cli::try_parse_from(argv).unwrap().config
}

/// Environment variables as written in a test.
type Vars<'a> = &'a [(&'a str, &'a str)];

fn env(vars: Vars) -> Vec<(String, String)> {
    vars.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn toml_file(text: &str) -> NamedTempFile {
    let mut file = NamedTempFile::new().unwrap();
    file.write_all(text.as_bytes()).unwrap();
    file
}

fn with_file(path: &Path, flags: &[&str]) -> ConfigArgs {
    let mut argv = vec!["--config", path.to_str().unwrap()];
    argv.extend_from_slice(flags);
    cli(&argv)
}

/// Loads and returns the error line, checking it is a single line.
fn error_line(args: &ConfigArgs, vars: Vars) -> String {
    let error = load_from(args, env(vars)).unwrap_err().to_string();
    assert!(!error.contains('\n'), "not one line: {error}");
    error
}

fn render_line<'a>(rendered: &'a str, key: &str) -> &'a str {
    rendered
        .lines()
        .find(|line| {
            line.starts_with(&format!("{key} = ")) || line.starts_with(&format!("# {key} = "))
        })
        .unwrap_or_else(|| panic!("{key} missing from:\n{rendered}"))
}

#[test]
fn no_layers_gives_defaults() {
    let loaded = load_from(&ConfigArgs::default(), env(&[("HOME", "/root")])).unwrap();
    assert_eq!(loaded.config, NodeConfig::default());
    for key in KEYS {
        assert_eq!(loaded.origin(key.name), Some(&Origin::Default));
    }
    let d = NodeConfig::default();
    assert_eq!(d.socket.path, PathBuf::from("/tmp/pegaflow.sock"));
    assert_eq!(d.socket.max_frame, Size::mib(8));
    assert_eq!(d.http.addr.to_string(), "127.0.0.1:9095");
    assert_eq!(d.pool.size, Size::gib(1));
    assert_eq!(d.pool.max_page_size, Size::mib(64));
    assert_eq!(d.pool.page_align, Size::kib(4));
    assert_eq!(d.dma.engine, DmaEngine::Auto);
    assert_eq!(d.ssd.dir, None);
    assert_eq!(d.ssd.size, Size(0));
    assert_eq!(d.ssd.admission, SsdAdmission::SecondHit);
    assert_eq!(d.ssd.queue_size, Size::mib(256));
    assert!(!d.fabric.enabled);
    assert_eq!(d.fabric.cluster_id, "pegaflow");
    assert_eq!(d.fabric.listen.to_string(), "0.0.0.0:9096");
    assert_eq!(d.fabric.gossip_interval_ms, 500);
    assert_eq!(d.fabric.failure_timeout_ms, 5000);
    assert_eq!(d.fabric.fetch_timeout_ms, 2000);
    assert_eq!(d.otlp.endpoint, None);
    assert_eq!(d.otlp.interval_ms, 10_000);
    assert_eq!(d.log.level, "info");
}

#[test]
fn each_layer_overrides_the_one_below() {
    let file = toml_file("[pool]\nsize = \"2GiB\"\n");
    let path = file.path().to_path_buf();
    let env_var = [("PEGAFLOW_POOL__SIZE", "3GiB")];

    let cases: [(ConfigArgs, Vars, Size, Origin); 4] = [
        (ConfigArgs::default(), &[], Size::gib(1), Origin::Default),
        (
            with_file(&path, &[]),
            &[],
            Size::gib(2),
            Origin::File(path.clone()),
        ),
        (
            with_file(&path, &[]),
            &env_var,
            Size::gib(3),
            Origin::Env("PEGAFLOW_POOL__SIZE".into()),
        ),
        (
            with_file(&path, &["--pool-size", "4GiB"]),
            &env_var,
            Size::gib(4),
            Origin::Flag("--pool-size"),
        ),
    ];
    for (args, vars, size, origin) in cases {
        let loaded = load_from(&args, env(vars)).unwrap();
        assert_eq!(loaded.config.pool.size, size);
        assert_eq!(loaded.origin("pool.size"), Some(&origin));
        let expected = format!("pool.size = \"{size}\"");
        let line = render_line(&loaded.render(), "pool.size").to_owned();
        assert!(line.starts_with(&expected), "{line}");
        assert!(line.ends_with(&format!("  # {origin}")), "{line}");
    }
}

#[test]
fn render_names_each_source() {
    let file = toml_file("http.addr = \"0.0.0.0:80\"\n");
    let args = with_file(file.path(), &["--log-level", "debug"]);
    let loaded = load_from(&args, env(&[("PEGAFLOW_DMA__ENGINE", "host")])).unwrap();
    let rendered = loaded.render();
    let file_comment = format!("  # file {}", file.path().display());
    assert!(render_line(&rendered, "http.addr").ends_with(&file_comment));
    assert!(render_line(&rendered, "dma.engine").ends_with("  # env PEGAFLOW_DMA__ENGINE"));
    assert!(render_line(&rendered, "log.level").ends_with("  # flag --log-level"));
    assert!(render_line(&rendered, "pool.size").ends_with("  # default"));
    assert!(render_line(&rendered, "ssd.dir").starts_with("# ssd.dir = (unset)"));
    assert_eq!(rendered.lines().count(), KEYS.len());
}

#[test]
fn rendered_config_loads_back_unchanged() {
    let vars = [
        ("PEGAFLOW_SSD__DIR", "/var/cache/pegaflow \"ssd\""),
        ("PEGAFLOW_SSD__SIZE", "64000000000B"),
        ("PEGAFLOW_FABRIC__ENABLED", "true"),
        ("PEGAFLOW_FABRIC__SECRET", "s3cret"),
        ("PEGAFLOW_FABRIC__SEEDS", "[10.0.0.2:9096, 10.0.0.3:9096]"),
        ("PEGAFLOW_FABRIC__ADVERTISE", "[::1]:9096"),
        ("PEGAFLOW_POOL__SIZE", "1536MiB"),
    ];
    let loaded = load_from(&ConfigArgs::default(), env(&vars)).unwrap();
    let rendered = loaded.render();
    assert!(render_line(&rendered, "ssd.size").starts_with("ssd.size = \"64GB\""));
    assert!(render_line(&rendered, "pool.size").starts_with("pool.size = \"1536MiB\""));
    // The secret is redacted, so it has to be supplied again.
    let secret_line = render_line(&rendered, "fabric.secret");
    assert!(
        secret_line.starts_with("# fabric.secret = (redacted)"),
        "{secret_line}"
    );
    assert!(!rendered.contains("s3cret"));
    let file = toml_file(&rendered);
    let secret = [("PEGAFLOW_FABRIC__SECRET", "s3cret")];
    let reloaded = load_from(&with_file(file.path(), &[]), env(&secret)).unwrap();
    assert_eq!(reloaded.config, loaded.config);
}

#[test]
fn nested_env_keys_reach_every_section() {
    let vars = [
        ("PEGAFLOW_SOCKET__MAX_FRAME", "16MiB"),
        ("PEGAFLOW_POOL__MAX_PAGE_SIZE", "1048576B"),
        ("PEGAFLOW_POOL__PAGE_ALIGN", "2MiB"),
        ("PEGAFLOW_FABRIC__ENABLED", "true"),
        ("PEGAFLOW_FABRIC__SECRET", "12345"),
        ("PEGAFLOW_FABRIC__ZONE", "7"),
        ("PEGAFLOW_FABRIC__NODE_ID", "node-a"),
        (
            "PEGAFLOW_FABRIC__SEEDS",
            "[\"10.0.0.2:9096\", \"10.0.0.3:9096\"]",
        ),
        ("PEGAFLOW_FABRIC__GOSSIP_INTERVAL_MS", "250"),
        ("PEGAFLOW_OTLP__ENDPOINT", "http://collector:4317"),
        ("PEGAFLOW_LOG__LEVEL", "pegaflow=debug,info"),
    ];
    let c = load_from(&ConfigArgs::default(), env(&vars))
        .unwrap()
        .config;
    assert_eq!(c.socket.max_frame, Size::mib(16));
    assert_eq!(c.pool.max_page_size, Size::mib(1));
    assert_eq!(c.pool.page_align, Size::mib(2));
    assert!(c.fabric.enabled);
    // Text keys stay text even when they look like numbers.
    assert_eq!(c.fabric.secret.as_deref(), Some("12345"));
    assert_eq!(c.fabric.zone, "7");
    assert_eq!(c.fabric.node_id.as_deref(), Some("node-a"));
    assert_eq!(c.fabric.seeds, ["10.0.0.2:9096", "10.0.0.3:9096"]);
    assert_eq!(c.fabric.gossip_interval_ms, 250);
    assert_eq!(c.otlp.endpoint.as_deref(), Some("http://collector:4317"));
    assert_eq!(c.log.level, "pegaflow=debug,info");
}

#[test]
fn every_flag_overrides_its_key() {
    let flags = [
        "--socket",
        "/run/pf.sock",
        "--http-addr",
        "0.0.0.0:8080",
        "--pool-size",
        "8GiB",
        "--max-page-size",
        "1MiB",
        "--dma",
        "cuda",
        "--ssd-dir",
        "/mnt/ssd",
        "--ssd-size",
        "100GiB",
        "--ssd-admission",
        "never",
        "--otlp-endpoint",
        "https://otel:4318",
        "--log-level",
        "warn",
    ];
    let loaded = load_from(&cli(&flags), env(&[])).unwrap();
    let c = &loaded.config;
    assert_eq!(c.socket.path, PathBuf::from("/run/pf.sock"));
    assert_eq!(c.http.addr.to_string(), "0.0.0.0:8080");
    assert_eq!(c.pool.size, Size::gib(8));
    assert_eq!(c.pool.max_page_size, Size::mib(1));
    assert_eq!(c.dma.engine, DmaEngine::Cuda);
    assert_eq!(c.ssd.dir, Some(PathBuf::from("/mnt/ssd")));
    assert_eq!(c.ssd.size, Size::gib(100));
    assert_eq!(c.ssd.admission, SsdAdmission::Never);
    assert_eq!(c.otlp.endpoint.as_deref(), Some("https://otel:4318"));
    assert_eq!(c.log.level, "warn");
    let with_flags: Vec<_> = KEYS.iter().filter(|k| k.flag.is_some()).collect();
    assert_eq!(with_flags.len(), 10);
    for key in with_flags {
        assert_eq!(loaded.origin(key.name), key.flag.map(Origin::Flag).as_ref());
    }
}

#[test]
fn table_flags_are_real_clap_flags() {
    let command = Cli::command();
    let longs: Vec<String> = command
        .get_arguments()
        .filter_map(|arg| arg.get_long().map(|long| format!("--{long}")))
        .collect();
    for flag in KEYS.iter().filter_map(|k| k.flag) {
        assert!(longs.iter().any(|l| l == flag), "{flag} not in {longs:?}");
    }
    assert!(longs.iter().any(|l| l == "--config"));
}

#[test]
fn config_file_from_env_unless_flag_given() {
    let from_env = toml_file("[log]\nlevel = \"debug\"\n");
    let from_flag = toml_file("[log]\nlevel = \"error\"\n");
    let var = [("PEGAFLOW_CONFIG", from_env.path().to_str().unwrap())];

    let loaded = load_from(&ConfigArgs::default(), env(&var)).unwrap();
    assert_eq!(loaded.config.log.level, "debug");
    assert_eq!(
        loaded.origin("log.level"),
        Some(&Origin::File(from_env.path().to_path_buf()))
    );

    let loaded = load_from(&with_file(from_flag.path(), &[]), env(&var)).unwrap();
    assert_eq!(loaded.config.log.level, "error");
}

#[test]
fn sizes_without_a_unit_are_refused_in_every_layer() {
    let expected = |value: &str, origin: &str| {
        format!(
            r#"config key pool.size = {value} ({origin}): expected a size with a unit such as "64GiB" ("4096B" for bytes)"#
        )
    };
    let error = |args: &ConfigArgs, vars: Vars| {
        load_from(args, env(vars))
            .expect_err("a size without a unit")
            .to_string()
    };
    assert_eq!(
        error(&cli(&["--pool-size", "12"]), &[]),
        expected(r#""12""#, "flag --pool-size")
    );
    assert_eq!(
        error(&ConfigArgs::default(), &[("PEGAFLOW_POOL__SIZE", "4096")]),
        expected(r#""4096""#, "env PEGAFLOW_POOL__SIZE")
    );
    let file = toml_file("[pool]\nsize = 1073741824\n");
    let file_origin = format!("file {}", file.path().display());
    assert_eq!(
        error(&with_file(file.path(), &[]), &[]),
        expected("1073741824", &file_origin)
    );
    let bytes = load_from(&cli(&["--pool-size", "1073741824B"]), env(&[])).unwrap();
    assert_eq!(bytes.config.pool.size, Size::gib(1));
}

#[test]
fn bad_values_name_key_value_origin_and_expectation() {
    let file = toml_file("[pool]\nsize = \"2GiB\"\nmax_page_size = \"4GiB\"\n");
    let file_path = file.path().display().to_string();
    let none = ConfigArgs::default();
    let cases: Vec<(ConfigArgs, Vars, String)> = vec![
        (
            none.clone(),
            &[("PEGAFLOW_POOL__SIZE", "12XB")],
            r#"config key pool.size = "12XB" (env PEGAFLOW_POOL__SIZE): expected a size with a unit such as "64GiB" ("4096B" for bytes)"#.into(),
        ),
        (
            cli(&["--pool-size", "12XB"]),
            &[],
            r#"config key pool.size = "12XB" (flag --pool-size): expected a size with a unit such as "64GiB" ("4096B" for bytes)"#.into(),
        ),
        (
            cli(&["--pool-size", "0B"]),
            &[],
            r#"config key pool.size = "0B" (flag --pool-size): expected a size greater than 0B"#.into(),
        ),
        (
            cli(&["--pool-size", "12B"]),
            &[],
            r#"config key pool.size = "12B" (flag --pool-size): expected a size of at least pool.max_page_size (64MiB), the largest page it must hold"#.into(),
        ),
        (
            cli(&["--max-page-size", "512MiB"]),
            &[],
            r#"config key pool.max_page_size = "512MiB" (flag --max-page-size): expected a size of at most ssd.queue_size (256MiB) so one page can be staged"#.into(),
        ),
        (
            with_file(file.path(), &[]),
            &[],
            format!(r#"config key pool.max_page_size = "4GiB" (file {file_path}): expected a size from 4KiB to pool.size (2GiB)"#),
        ),
        (
            none.clone(),
            &[("PEGAFLOW_POOL__MAX_PAGE_SIZE", "1KiB")],
            r#"config key pool.max_page_size = "1KiB" (env PEGAFLOW_POOL__MAX_PAGE_SIZE): expected a size from 4KiB to pool.size (1GiB)"#.into(),
        ),
        (
            none.clone(),
            &[("PEGAFLOW_POOL__PAGE_ALIGN", "3000B")],
            r#"config key pool.page_align = "3000B" (env PEGAFLOW_POOL__PAGE_ALIGN): expected a power of two such as "4KiB""#.into(),
        ),
        (
            none.clone(),
            &[("PEGAFLOW_SOCKET__MAX_FRAME", "2GiB")],
            r#"config key socket.max_frame = "2GiB" (env PEGAFLOW_SOCKET__MAX_FRAME): expected a size from 4KiB to 1GiB"#.into(),
        ),
        (
            cli(&["--socket", ""]),
            &[],
            r#"config key socket.path = "" (flag --socket): expected a non-empty path of at most 107 bytes (Unix socket limit)"#.into(),
        ),
        (
            cli(&["--http-addr", "localhost"]),
            &[],
            r#"config key http.addr = "localhost" (flag --http-addr): expected a socket address such as "127.0.0.1:9095""#.into(),
        ),
        (
            cli(&["--dma", "gpu"]),
            &[],
            r#"config key dma.engine = "gpu" (flag --dma): expected one of "auto", "host", "cuda""#.into(),
        ),
        (
            cli(&["--ssd-dir", "/mnt/ssd"]),
            &[],
            r#"config key ssd.size = "0B" (default): expected a size greater than 0B because ssd.dir is set"#.into(),
        ),
        (
            cli(&["--ssd-admission", "lru"]),
            &[],
            r#"config key ssd.admission = "lru" (flag --ssd-admission): expected one of "always", "second_hit", "never""#.into(),
        ),
        (
            none.clone(),
            &[("PEGAFLOW_SSD__QUEUE_SIZE", "1MiB")],
            r#"config key ssd.queue_size = "1MiB" (env PEGAFLOW_SSD__QUEUE_SIZE): expected a size of at least pool.max_page_size (64MiB) so one page can be staged"#.into(),
        ),
        (
            none.clone(),
            &[("PEGAFLOW_FABRIC__ENABLED", "true")],
            "config key fabric.secret = (unset) (default): expected a non-empty shared secret because fabric.enabled is true".into(),
        ),
        (
            none.clone(),
            &[("PEGAFLOW_FABRIC__ENABLED", "yes")],
            r#"config key fabric.enabled = "yes" (env PEGAFLOW_FABRIC__ENABLED): expected true or false"#.into(),
        ),
        (
            none.clone(),
            &[("PEGAFLOW_FABRIC__SEEDS", "10.0.0.2:9096")],
            r#"config key fabric.seeds = "10.0.0.2:9096" (env PEGAFLOW_FABRIC__SEEDS): expected a list of addresses such as ["10.0.0.2:9096"]"#.into(),
        ),
        (
            none.clone(),
            &[("PEGAFLOW_FABRIC__GOSSIP_INTERVAL_MS", "0")],
            "config key fabric.gossip_interval_ms = 0 (env PEGAFLOW_FABRIC__GOSSIP_INTERVAL_MS): expected a number of milliseconds greater than 0".into(),
        ),
        (
            none.clone(),
            &[("PEGAFLOW_OTLP__INTERVAL_MS", "10s")],
            r#"config key otlp.interval_ms = "10s" (env PEGAFLOW_OTLP__INTERVAL_MS): expected a whole number of milliseconds"#.into(),
        ),
        (
            cli(&["--otlp-endpoint", "collector:4317"]),
            &[],
            r#"config key otlp.endpoint = "collector:4317" (flag --otlp-endpoint): expected an http:// or https:// URL"#.into(),
        ),
        (
            cli(&["--log-level", "verbose"]),
            &[],
            r#"config key log.level = "verbose" (flag --log-level): expected one of trace, debug, info, warn, error or a filter directive containing '=' such as "pegaflow=debug,info""#.into(),
        ),
    ];
    for (args, vars, expected) in cases {
        assert_eq!(error_line(&args, vars), expected);
    }
}

#[test]
fn wrong_type_in_file_names_the_file() {
    let file = toml_file("[fabric]\nseeds = [\"a:1\", 2]\n");
    let error = error_line(&with_file(file.path(), &[]), &[]);
    assert_eq!(
        error,
        format!(
            r#"config key fabric.seeds = ["a:1", 2] (file {}): expected a list of addresses such as ["10.0.0.2:9096"]"#,
            file.path().display()
        )
    );
}

#[test]
fn secrets_are_not_echoed_in_errors() {
    let file = toml_file("[fabric]\nenabled = true\nsecret = 12345\n");
    let error = error_line(&with_file(file.path(), &[]), &[]);
    assert_eq!(
        error,
        format!(
            "config key fabric.secret = (redacted) (file {}): expected a string",
            file.path().display()
        )
    );
    let vars = [
        ("PEGAFLOW_FABRIC__ENABLED", "true"),
        ("PEGAFLOW_FABRIC__SECRET", ""),
    ];
    assert_eq!(
        error_line(&ConfigArgs::default(), &vars),
        "config key fabric.secret = \"\" (env PEGAFLOW_FABRIC__SECRET): expected a non-empty shared secret because fabric.enabled is true"
    );
}

#[test]
fn unknown_keys_are_errors() {
    let error = error_line(&ConfigArgs::default(), &[("PEGAFLOW_POOL__SIZ", "4GiB")]);
    assert_eq!(
        error,
        "unknown config key pool.siz (env PEGAFLOW_POOL__SIZ): expected one of pool.size, pool.max_page_size, pool.page_align"
    );

    let error = error_line(&ConfigArgs::default(), &[("PEGAFLOW_POOL_SIZE", "4GiB")]);
    assert!(error.starts_with("unknown config key pool_size (env PEGAFLOW_POOL_SIZE): expected a key in one of the sections socket, http, pool,"), "{error}");

    let file = toml_file("[pool]\nsize = \"4GiB\"\nmax_page = \"1MiB\"\n");
    let error = error_line(&with_file(file.path(), &[]), &[]);
    assert_eq!(
        error,
        format!(
            "unknown config key pool.max_page (file {}): expected one of pool.size, pool.max_page_size, pool.page_align",
            file.path().display()
        )
    );

    let file = toml_file("[pools]\nsize = \"4GiB\"\n");
    let error = error_line(&with_file(file.path(), &[]), &[]);
    assert!(
        error.starts_with("unknown config key pools.size (file "),
        "{error}"
    );

    let file = toml_file("pool = 5\n");
    let error = error_line(&with_file(file.path(), &[]), &[]);
    assert!(
        error.ends_with(
            "): expected a table with keys pool.size, pool.max_page_size, pool.page_align"
        ),
        "{error}"
    );

    // Variables outside the prefix, PEGAFLOW_CONFIG itself and the tools' own are not config keys.
    let vars = env(&[
        ("PATH", "/bin"),
        ("PEGAFLOWX", "1"),
        ("PEGAFLOW_NODE_BIN", "/opt/pegaflow-node"),
        ("PEGAFLOW_SKIP_VLLM", "1"),
        ("PEGAFLOW_SKIP_SGLANG", "1"),
    ]);
    assert!(load_from(&ConfigArgs::default(), vars).is_ok());
}

#[test]
fn missing_or_broken_file_names_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.toml");
    let error = error_line(&with_file(&missing, &[]), &[]);
    let prefix = format!(
        "cannot read config file {} (flag --config): ",
        missing.display()
    );
    assert!(error.starts_with(&prefix), "{error}");

    let missing = missing.to_str().unwrap();
    let error = error_line(&ConfigArgs::default(), &[("PEGAFLOW_CONFIG", missing)]);
    assert!(
        error.contains(&format!("{missing} (env PEGAFLOW_CONFIG)")),
        "{error}"
    );

    let broken = toml_file("[pool\nsize = \"4GiB\"\n");
    let error = error_line(&with_file(broken.path(), &[]), &[]);
    let prefix = format!(
        "config file {} (flag --config) is not valid TOML: ",
        broken.path().display()
    );
    assert!(error.starts_with(&prefix), "{error}");
    assert!(error.contains("line 1"), "{error}");
}

#[test]
fn docs_describe_every_key() {
    let docs_path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/configuration.md");
    let docs = std::fs::read_to_string(docs_path).unwrap();
    let rendered = load_from(&ConfigArgs::default(), env(&[]))
        .unwrap()
        .render();
    assert_eq!(rendered.lines().count(), KEYS.len());
    for key in KEYS {
        assert!(
            docs.contains(&format!("`{}`", key.name)),
            "{} undocumented",
            key.name
        );
        assert!(
            docs.contains(&env_var(key.name)),
            "{} undocumented",
            env_var(key.name)
        );
        if let Some(flag) = key.flag {
            assert!(docs.contains(&format!("`{flag}")), "{flag} undocumented");
        }
    }
}

#[test]
fn docs_example_file_loads() {
    let docs_path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/configuration.md");
    let docs = std::fs::read_to_string(docs_path).unwrap();
    let example = docs.split("## Example file").nth(1).unwrap();
    let example = example.split("```toml\n").nth(1).unwrap();
    let example = example.split("```").next().unwrap();
    let file = toml_file(example);
    let loaded = load_from(&with_file(file.path(), &[]), env(&[])).unwrap();
    assert_eq!(loaded.config.pool.size, Size::gib(64));
    assert_eq!(loaded.config.fabric.seeds.len(), 2);
    for key in KEYS {
        let origin = loaded.origin(key.name).unwrap();
        let expected = match key.name {
            "fabric.node_id" => Origin::Default,
            _ => Origin::File(file.path().to_path_buf()),
        };
        assert_eq!(origin, &expected, "{} in docs example", key.name);
    }
}

#[test]
fn topology_declares_host_gpus_on_numa_nodes() {
    let file = toml_file(
        "[topology]\nnuma_nodes = [0, 1]\n\
         gpus = [{ uuid = \"rank-0\", numa_node = 0 }, { uuid = \"rank-1\", numa_node = 1 }]\n",
    );
    let loaded = load_from(&with_file(file.path(), &[]), env(&[])).unwrap();
    let topology = &loaded.config.topology;
    assert_eq!(topology.numa_nodes, [0, 1]);
    assert_eq!(topology.gpus[1].uuid, "rank-1");
    assert_eq!(topology.gpus[1].numa_node, 1);
    let rendered = loaded.render();
    assert!(
        render_line(&rendered, "topology.gpus")
            .contains(r#"{ "numa_node" = 0, "uuid" = "rank-0" }"#),
        "{rendered}"
    );

    for (text, why) in [
        (
            "[topology]\ngpus = [{ uuid = \"a\", numa_node = 0 }, { uuid = \"a\", numa_node = 0 }]\n",
            "distinct, non-empty uuids (entry 1 is \"a\")",
        ),
        (
            "[topology]\nnuma_nodes = [0]\ngpus = [{ uuid = \"a\", numa_node = 1 }]\n",
            "on nodes of topology.numa_nodes (entry 0 is on node 1)",
        ),
    ] {
        let file = toml_file(text);
        let error = error_line(&with_file(file.path(), &[]), &[]);
        assert!(error.starts_with("config key topology.gpus = "), "{error}");
        assert!(error.contains(why), "{error}");
    }
    let file = toml_file("[topology]\nnuma_nodes = [1, 1]\n");
    let error = error_line(&with_file(file.path(), &[]), &[]);
    assert!(error.contains("distinct NUMA node numbers"), "{error}");
}
