//! The four layers (defaults < TOML file < `PEGAFLOW_*` env < flags), merged with figment.
//!
//! We build the file, env and flag layers ourselves rather than using figment's `Toml::file`
//! and `Env` providers: those silently skip a missing file and read the process environment
//! directly, while we must reject typos, name the exact variable or flag behind every value,
//! and let tests pass their own environment.

use std::path::PathBuf;

use figment::providers::{Format, Serialized, Toml};
use figment::value::{Dict, Map, Value};
use figment::{Figment, Metadata, Profile, Provider};

use crate::args::ConfigArgs;
use crate::error::ConfigError;
use crate::keys::{self, EnvSyntax, Key, ENV_PREFIX};
use crate::literal::{literal, REDACTED, UNSET};
use crate::node_config::NodeConfig;
use crate::origin::Origin;

/// The variable naming the config file when `--config` is absent; not itself a config key.
const CONFIG_ENV: &str = "PEGAFLOW_CONFIG";

/// Variables of PegaFlow's own tools (test harnesses, the connector) that share the prefix but
/// configure something other than the node, so a node started from their environment runs.
/// Every other `PEGAFLOW_*` variable must be a config key: a typo is an error, not ignored.
pub(crate) const TOOLING_ENV: [&str; 3] = [
    "PEGAFLOW_NODE_BIN",
    "PEGAFLOW_SKIP_VLLM",
    "PEGAFLOW_SKIP_SGLANG",
];

/// One value set by an environment variable or a flag.
struct Override {
    key: &'static Key,
    origin: Origin,
    value: Value,
}

/// The config file as read, remembered for origins.
struct FileLayer {
    path: PathBuf,
    values: Value,
}

/// All layers, plus their merge.
pub(crate) struct Sources {
    file: Option<FileLayer>,
    env: Vec<Override>,
    flags: Vec<Override>,
    merged: Figment,
}

impl Sources {
    /// Reads the file and environment named by `args` and `env`, rejecting unknown keys.
    pub(crate) fn gather(
        args: &ConfigArgs,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Sources, ConfigError> {
        let env: Vec<(String, String)> = env
            .into_iter()
            .filter(|(name, _)| name.starts_with(ENV_PREFIX))
            .collect();
        let config_path = match &args.config {
            Some(path) => Some((path.clone(), Origin::Flag("--config"))),
            None => env
                .iter()
                .find(|(name, _)| name == CONFIG_ENV)
                .map(|(_, path)| (PathBuf::from(path), Origin::Env(CONFIG_ENV.to_owned()))),
        };
        let file = config_path
            .map(|(path, origin)| read_file(path, origin))
            .transpose()?;
        let env = env
            .into_iter()
            .filter(|(name, _)| name != CONFIG_ENV && !TOOLING_ENV.contains(&name.as_str()))
            .map(|(name, text)| env_override(name, text))
            .collect::<Result<Vec<_>, _>>()?;
        let flags = args
            .overrides()
            .into_iter()
            .filter_map(|(name, text)| {
                let key = keys::find(name)?;
                Some(Override {
                    key,
                    origin: Origin::Flag(key.flag?),
                    value: Value::from(text),
                })
            })
            .collect::<Vec<_>>();

        let mut merged = Figment::from(Serialized::defaults(NodeConfig::default()));
        if let Some(file) = &file {
            merged = merged.merge(Layer::new("config file", file.values.clone()));
        }
        let merged = merged
            .merge(Layer::overrides("environment", &env))
            .merge(Layer::overrides("flags", &flags));
        Ok(Sources {
            file,
            env,
            flags,
            merged,
        })
    }

    /// The merged layers as typed config; a value of the wrong shape names its key and layer.
    pub(crate) fn extract(&self) -> Result<NodeConfig, ConfigError> {
        self.merged.extract().map_err(|error| {
            let first = error.into_iter().next();
            let path = first.as_ref().map(|e| e.path.clone()).unwrap_or_default();
            // The deepest known key on the error's path: `fabric.seeds.1` is `fabric.seeds`.
            let key = (1..=path.len())
                .rev()
                .find_map(|len| keys::find(&path[..len].join(".")));
            match (key, first) {
                (Some(key), _) => self.invalid(key.name, key.expected),
                (None, Some(e)) => self.invalid(&path.join("."), e.kind.to_string()),
                (None, None) => self.invalid("", "a valid configuration"),
            }
        })
    }

    /// The error for `name`'s effective value, naming the layer it came from.
    pub(crate) fn invalid(&self, name: &str, expected: impl Into<String>) -> ConfigError {
        let value = match self.merged.find_value(name) {
            Ok(Value::Empty(..)) | Err(_) => UNSET.to_owned(),
            Ok(value) if keys::is_redacted(name) && value.as_str() != Some("") => {
                REDACTED.to_owned()
            }
            Ok(value) => literal(&value),
        };
        ConfigError::Invalid {
            key: name.to_owned(),
            value,
            origin: self.origin(name),
            expected: expected.into(),
        }
    }

    /// The highest layer that set `name`.
    pub(crate) fn origin(&self, name: &str) -> Origin {
        let set_by = |overrides: &[Override]| {
            overrides
                .iter()
                .rev()
                .find(|o| o.key.name == name)
                .map(|o| o.origin.clone())
        };
        set_by(&self.flags)
            .or_else(|| set_by(&self.env))
            .or_else(|| {
                let file = self.file.as_ref()?;
                file.values.find_ref(name)?;
                Some(Origin::File(file.path.clone()))
            })
            .unwrap_or(Origin::Default)
    }
}

/// Reads and parses the TOML file, and checks that every key in it exists.
fn read_file(path: PathBuf, origin: Origin) -> Result<FileLayer, ConfigError> {
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(error) => {
            return Err(ConfigError::ReadFile {
                path,
                origin,
                error,
            })
        }
    };
    let dict = match Toml::from_str::<Dict>(&text) {
        Ok(dict) => dict,
        Err(error) => {
            let reason = one_line(&error.to_string());
            return Err(ConfigError::ParseFile {
                path,
                origin,
                reason,
            });
        }
    };
    let key_origin = Origin::File(path.clone());
    for (section, fields) in &dict {
        let Value::Dict(_, fields) = fields else {
            return Err(unknown_or_not_a_table(section, fields, key_origin));
        };
        for field in fields.keys() {
            let name = format!("{section}.{field}");
            if keys::find(&name).is_none() {
                return Err(unknown(name, key_origin));
            }
        }
    }
    Ok(FileLayer {
        path,
        values: Value::from(dict),
    })
}

/// A section written as a plain value (`pool = 5`), or a key outside every section.
fn unknown_or_not_a_table(section: &str, value: &Value, origin: Origin) -> ConfigError {
    let fields = keys::keys_in(section);
    if fields.is_empty() {
        return unknown(section.to_owned(), origin);
    }
    ConfigError::Invalid {
        key: section.to_owned(),
        value: literal(value),
        origin,
        expected: format!("a table with keys {}", fields.join(", ")),
    }
}

/// The error for a key that does not exist, listing what does.
fn unknown(name: String, origin: Origin) -> ConfigError {
    let section = name.split('.').next().unwrap_or_default();
    let fields = keys::keys_in(section);
    let expected = if fields.is_empty() {
        format!(
            "a key in one of the sections {}",
            keys::sections().join(", ")
        )
    } else {
        format!("one of {}", fields.join(", "))
    };
    ConfigError::UnknownKey {
        key: name,
        origin,
        expected,
    }
}

/// `PEGAFLOW_POOL__MAX_PAGE_SIZE=64MiB` as the value of `pool.max_page_size`.
fn env_override(var: String, text: String) -> Result<Override, ConfigError> {
    let name = var[ENV_PREFIX.len()..]
        .to_ascii_lowercase()
        .replace("__", ".");
    let origin = Origin::Env(var);
    let Some(key) = keys::find(&name) else {
        return Err(unknown(name, origin));
    };
    let value = match key.env {
        EnvSyntax::Text => Value::from(text),
        EnvSyntax::Value => {
            let Ok(value) = text.parse::<Value>();
            value
        }
    };
    Ok(Override { key, origin, value })
}

/// Parser messages span several lines (a source excerpt with a caret); keep the words.
fn one_line(message: &str) -> String {
    message
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.contains('|'))
        .collect::<Vec<_>>()
        .join(": ")
}

/// A figment provider over a dictionary we have already built and checked.
struct Layer {
    name: &'static str,
    dict: Dict,
}

impl Layer {
    fn new(name: &'static str, values: Value) -> Layer {
        Layer {
            name,
            dict: values.into_dict().unwrap_or_default(),
        }
    }

    /// Nests dotted keys: `pool.size` becomes `{pool: {size: ..}}`.
    fn overrides(name: &'static str, overrides: &[Override]) -> Layer {
        let mut dict = Dict::new();
        for o in overrides {
            let (section, field) = o.key.name.split_once('.').unwrap_or(("", o.key.name));
            let fields = dict
                .entry(section.to_owned())
                .or_insert_with(|| Value::from(Dict::new()));
            if let Value::Dict(_, fields) = fields {
                fields.insert(field.to_owned(), o.value.clone());
            }
        }
        Layer { name, dict }
    }
}

impl Provider for Layer {
    fn metadata(&self) -> Metadata {
        Metadata::named(self.name)
    }

    fn data(&self) -> figment::Result<Map<Profile, Dict>> {
        Ok(Profile::Default.collect(self.dict.clone()))
    }
}
