//! The version rule `hello` enforces (docs/protocol.md "Versions"): a client and a node work
//! together when they speak the same protocol (`v` of every frame) and their package versions
//! agree in major and minor; a patch difference is compatible. The Python client applies the
//! same rule to the node's reply, with the same message, so whichever side is older, the user
//! reads one line naming both versions and what to upgrade.

use super::error::{ErrorCode, ProtoError};
use super::request::PROTOCOL_VERSION;

/// This node's package version, sent in `hello`'s reply.
pub const PACKAGE_VERSION: &str = env!("CARGO_PKG_VERSION");

/// `(major, minor)` of a version such as `"0.1.3"` (a suffix after the patch is ignored).
fn major_minor(version: &str) -> Option<(u64, u64)> {
    let mut parts = version.split('.');
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

/// Refuses a client whose package `version` (from `hello`) cannot work with this node.
pub fn check_client_version(version: &str) -> Result<(), ProtoError> {
    let (Some(client), Some(node)) = (major_minor(version), major_minor(PACKAGE_VERSION)) else {
        return Err(ProtoError::new(
            ErrorCode::BadField,
            format!("field `version`: {version:?} is not a version such as \"0.1.0\""),
        ));
    };
    if client == node {
        return Ok(());
    }
    let upgrade = if client < node {
        format!("upgrade the pegaflow package to {}.{}.x", node.0, node.1)
    } else {
        format!("upgrade pegaflow-node to {}.{}.x", client.0, client.1)
    };
    Err(ProtoError::new(
        ErrorCode::IncompatibleVersion,
        format!(
            "pegaflow {version} (client) and pegaflow-node {PACKAGE_VERSION} are incompatible \
             (major.minor must match); {upgrade}"
        ),
    ))
}

/// The reply to a frame whose `v` is not this node's protocol.
pub fn unsupported_protocol(v: u64) -> ProtoError {
    let upgrade = if v < u64::from(PROTOCOL_VERSION) {
        "upgrade the pegaflow package"
    } else {
        "upgrade pegaflow-node"
    };
    ProtoError::new(
        ErrorCode::UnsupportedVersion,
        format!(
            "field `v`: protocol {v} is not supported by pegaflow-node {PACKAGE_VERSION}, which \
             speaks protocol {PROTOCOL_VERSION}; {upgrade}"
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn own() -> (u64, u64) {
        major_minor(PACKAGE_VERSION).expect("own version parses")
    }

    #[test]
    fn a_patch_difference_is_compatible() {
        let (major, minor) = own();
        assert_eq!(check_client_version(&format!("{major}.{minor}.99")), Ok(()));
        assert_eq!(check_client_version(PACKAGE_VERSION), Ok(()));
    }

    #[test]
    fn a_newer_client_asks_to_upgrade_the_node() {
        let (major, minor) = own();
        let client = format!("{major}.{}.0", minor + 1);
        let error = check_client_version(&client).expect_err("minor differs");
        assert_eq!(error.code, ErrorCode::IncompatibleVersion);
        assert_eq!(
            error.message,
            format!(
                "pegaflow {client} (client) and pegaflow-node {PACKAGE_VERSION} are incompatible \
                 (major.minor must match); upgrade pegaflow-node to {major}.{}.x",
                minor + 1
            )
        );
    }

    #[test]
    fn an_older_client_asks_to_upgrade_the_package() {
        let (major, minor) = own();
        let error = check_client_version("0.0.1").expect_err("0.0 is older than this node");
        assert_eq!(error.code, ErrorCode::IncompatibleVersion);
        assert!(
            error.message.ends_with(&format!(
                "upgrade the pegaflow package to {major}.{minor}.x"
            )),
            "{}",
            error.message
        );
    }

    #[test]
    fn a_malformed_version_names_the_field() {
        let error = check_client_version("latest").expect_err("not a version");
        assert_eq!(error.code, ErrorCode::BadField);
        assert!(error.message.starts_with("field `version`"));
    }
}
