//! OpenSSH public keys, as a KeyPair imports them: the line of a `.pub` file
//! (`ssh-ed25519 AAAA… comment`), checked down to the structure of the key blob so that
//! a truncated or mislabelled paste is refused at apply time rather than by the guest.

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD};
use sha2::{Digest, Sha256};

use super::syntax::shown;

/// The key types Ferro accepts, as OpenSSH names them.
const KEY_TYPES: &[&str] = &[
    "ssh-ed25519",
    "ssh-rsa",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
];

/// The smallest RSA modulus OpenSSH accepts, in bits.
const RSA_MIN_BITS: usize = 1024;

/// A parsed public key line.
#[derive(Debug)]
pub(super) struct PublicKey {
    /// The key's type, one of [`KEY_TYPES`].
    #[cfg_attr(not(test), allow(dead_code))]
    pub key_type: &'static str,
    /// The decoded key blob, as the SSH wire format lays it out.
    pub blob: Vec<u8>,
}

/// Parses an OpenSSH public key line: `<type> <base64 blob> [comment]`.
pub(super) fn parse_public_key(line: &str) -> Result<PublicKey, String> {
    let line = line.trim();
    if line.contains(['\n', '\r']) {
        return Err("must be a single line".to_owned());
    }
    let mut words = line.split_ascii_whitespace();
    let (Some(key_type), Some(data)) = (words.next(), words.next()) else {
        return Err("expected `<type> <base64 key> [comment]`, as in a .pub file".to_owned());
    };
    let Some(key_type) = KEY_TYPES.iter().copied().find(|t| *t == key_type) else {
        return Err(format!(
            "{} is not a supported key type: {}",
            shown(key_type),
            KEY_TYPES.join(", ")
        ));
    };
    let blob = STANDARD
        .decode(data)
        .map_err(|_| "the key data is not valid base64".to_owned())?;
    check_blob(key_type, &blob)?;
    Ok(PublicKey { key_type, blob })
}

/// Checks that a key blob holds a key of the named type and nothing else.
fn check_blob(key_type: &str, blob: &[u8]) -> Result<(), String> {
    let malformed = || format!("the key data is not a valid {key_type} key");
    let mut reader = Reader(blob);
    let embedded = reader.string().ok_or_else(malformed)?;
    if embedded != key_type.as_bytes() {
        return Err(match std::str::from_utf8(embedded) {
            Ok(other) if KEY_TYPES.contains(&other) => {
                format!("the key data holds a {other} key, not {key_type}")
            }
            _ => malformed(),
        });
    }
    match key_type {
        "ssh-ed25519" => {
            let key = reader.string().ok_or_else(malformed)?;
            if key.len() != 32 {
                return Err(malformed());
            }
        }
        "ssh-rsa" => {
            let exponent = reader.string().ok_or_else(malformed)?;
            let modulus = reader.string().ok_or_else(malformed)?;
            let bits = mpint_bits(modulus);
            if mpint_bits(exponent) == 0 || bits == 0 {
                return Err(malformed());
            }
            if bits < RSA_MIN_BITS {
                return Err(format!(
                    "the RSA key has {bits} bits; at least {RSA_MIN_BITS} are required"
                ));
            }
        }
        _ => {
            // ecdsa-sha2-<curve>: the curve's name again, then an uncompressed point.
            let curve = key_type.trim_start_matches("ecdsa-sha2-");
            let point_len = match curve {
                "nistp256" => 65,
                "nistp384" => 97,
                _ => 133,
            };
            let named = reader.string().ok_or_else(malformed)?;
            let point = reader.string().ok_or_else(malformed)?;
            if named != curve.as_bytes() || point.len() != point_len || point[0] != 4 {
                return Err(malformed());
            }
        }
    }
    if !reader.0.is_empty() {
        return Err(malformed());
    }
    Ok(())
}

/// The number of significant bits of a non-negative SSH `mpint`; 0 for zero or a
/// negative number.
fn mpint_bits(bytes: &[u8]) -> usize {
    if bytes.first().is_some_and(|b| b & 0x80 != 0) {
        return 0;
    }
    let Some(first) = bytes.iter().position(|&b| b != 0) else {
        return 0;
    };
    (bytes.len() - first) * 8 - bytes[first].leading_zeros() as usize
}

/// Reads SSH wire-format strings: a big-endian u32 length, then that many bytes.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn string(&mut self) -> Option<&'a [u8]> {
        let (len, rest) = self.0.split_first_chunk::<4>()?;
        let len = usize::try_from(u32::from_be_bytes(*len)).ok()?;
        if rest.len() < len {
            return None;
        }
        let (value, rest) = rest.split_at(len);
        self.0 = rest;
        Some(value)
    }
}

/// The SHA-256 fingerprint of an OpenSSH public key line, as `ssh-keygen -l` prints it
/// (`SHA256:` and the unpadded base64 of the digest of the key blob), or `None` when the
/// line is not a valid public key (the same rules as KeyPair validation).
pub fn ssh_fingerprint(public_key: &str) -> Option<String> {
    let key = parse_public_key(public_key).ok()?;
    let digest = Sha256::digest(&key.blob);
    Some(format!("SHA256:{}", STANDARD_NO_PAD.encode(digest)))
}

#[cfg(test)]
mod tests {
    use super::*;

    // Generated with ssh-keygen for these tests; the private halves were discarded. The
    // fingerprints are what `ssh-keygen -l -f` printed.
    const ED25519: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIMYuernJDQTgP8BeohxMCEJLFLSvWUaWkkmdvqkS+rOH demo@ferro";
    const ED25519_FP: &str = "SHA256:5O6Qi5+V5c2mGnEsddvAotjZ57lAvIiGweU+modV2R0";
    const RSA: &str = "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQDf5GWRXWltRx1cTEhcva9DA2Xrs4ZlvZUBAhzGmcivDdZzv7WVkuor1dVGQ6H/c2/ZkSdP4Jqp35lZvS7HT1cEboc2I7YEW1O9P2uTjxlCzteuz9hJT3Vve9tBEqWP24rBUsuar9l3kQOMqipQVEyLvM8ZDICT5rvUQDstLPlHtqmgyMqi5mXN3wVqCopbNBSG40HIGYg2oMrUe/dpKcIeHisOPqym8RRvtDBJ4P4NuCIMeq8e3UAyncfIf//pjFszk4fbk6Rqnu+dlA5gQlrQzvKOK89oaS+9qlPkq6dEztiF1UObYIhB9HWycwm0xfDX+ghLNeE67Bczso2Pl3r/ rsa@ferro";
    const RSA_FP: &str = "SHA256:6WLxhNtIwWtJjmn/G6BFmchNu637J6rbgo4XCwUfrak";
    const RSA_1024_NO_COMMENT: &str = "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAAAgQCoW0fsgxOliCSYEYVkNwjGwC8uYcGbu+oMLGErx5xQJH0ejtRKmS4aNn6VCCI9xschraP0gp9MslkrhvWRwjWc0MrhgVtyXWlHXDpAnXVuXMiPIzJxAaeKPnj6oX5KE5kKI5dULsCTjOgJKaP9ncDXl4WfgfGK46CLs9S53RSzcQ==";
    const RSA_1024_FP: &str = "SHA256:Pd8SntJ9YtorPcQzeNGDgHN0ljEcKBaMgOhzUfEp/fA";
    const ECDSA_384: &str = "ecdsa-sha2-nistp384 AAAAE2VjZHNhLXNoYTItbmlzdHAzODQAAAAIbmlzdHAzODQAAABhBF20gHlGryvJjPqfWnMwlR9cBYsZUjMVGasWfjserbz8iDBsMXkPMKKNfaHaHHJ9kDVbD73M4E7FLMQSy6WAP6TNRsJ1GeVm3rtDInEUF9DC5x0dknibgNKrXGPBe1x/0w== ec@ferro";
    const ECDSA_384_FP: &str = "SHA256:mteIzffTAOrRhCWEu57KB9tR2RTzKFScgwM+cnhCmGo";

    fn wire(parts: &[&[u8]]) -> String {
        let mut blob = Vec::new();
        for part in parts {
            blob.extend_from_slice(&(part.len() as u32).to_be_bytes());
            blob.extend_from_slice(part);
        }
        STANDARD.encode(blob)
    }

    #[test]
    fn fingerprints_match_ssh_keygen() {
        assert_eq!(ssh_fingerprint(ED25519).as_deref(), Some(ED25519_FP));
        assert_eq!(ssh_fingerprint(RSA).as_deref(), Some(RSA_FP));
        assert_eq!(
            ssh_fingerprint(RSA_1024_NO_COMMENT).as_deref(),
            Some(RSA_1024_FP)
        );
        assert_eq!(ssh_fingerprint(ECDSA_384).as_deref(), Some(ECDSA_384_FP));
        // The comment and surrounding whitespace do not change the key.
        let bare = ED25519.trim_end_matches(" demo@ferro");
        assert_eq!(
            ssh_fingerprint(&format!("  {bare}   other comment words\n")).as_deref(),
            Some(ED25519_FP)
        );
        assert_eq!(ssh_fingerprint("ssh-ed25519 nope"), None);
    }

    #[test]
    fn parses_every_supported_type() {
        for (line, key_type) in [
            (ED25519, "ssh-ed25519"),
            (RSA, "ssh-rsa"),
            (ECDSA_384, "ecdsa-sha2-nistp384"),
        ] {
            assert_eq!(parse_public_key(line).unwrap().key_type, key_type);
        }
        let p256 = wire(&[b"ecdsa-sha2-nistp256", b"nistp256", &[4; 65]]);
        assert!(parse_public_key(&format!("ecdsa-sha2-nistp256 {p256}")).is_ok());
        let p521 = wire(&[b"ecdsa-sha2-nistp521", b"nistp521", &[4; 133]]);
        assert!(parse_public_key(&format!("ecdsa-sha2-nistp521 {p521}")).is_ok());
    }

    #[test]
    fn refuses_malformed_keys_with_a_reason() {
        let ed_data = ED25519.split(' ').nth(1).unwrap();
        let rsa_data = RSA.split(' ').nth(1).unwrap();
        let mut small_modulus = vec![0u8];
        small_modulus.extend([0xff; 96]);
        let cases = [
            ("", "expected `<type> <base64 key> [comment]`, as in a .pub file".to_owned()),
            ("ssh-ed25519", "expected `<type> <base64 key> [comment]`, as in a .pub file".to_owned()),
            (
                "ssh-dss AAAA",
                "`ssh-dss` is not a supported key type: ssh-ed25519, ssh-rsa, ecdsa-sha2-nistp256, ecdsa-sha2-nistp384, ecdsa-sha2-nistp521".to_owned(),
            ),
            ("ssh-ed25519 AAAA%%", "the key data is not valid base64".to_owned()),
            (
                &format!("ssh-rsa {ed_data}"),
                "the key data holds a ssh-ed25519 key, not ssh-rsa".to_owned(),
            ),
            (
                &format!("ssh-ed25519 {rsa_data}"),
                "the key data holds a ssh-rsa key, not ssh-ed25519".to_owned(),
            ),
            (
                &format!("ssh-ed25519 {}", &ed_data[..40]),
                "the key data is not a valid ssh-ed25519 key".to_owned(),
            ),
            (
                &format!("ssh-ed25519 {}", wire(&[b"ssh-ed25519", &[1; 32], b"extra"])),
                "the key data is not a valid ssh-ed25519 key".to_owned(),
            ),
            (
                &format!("ssh-ed25519 {}", wire(&[b"ssh-ed25519", &[1; 31]])),
                "the key data is not a valid ssh-ed25519 key".to_owned(),
            ),
            (
                &format!("ssh-rsa {}", wire(&[b"ssh-rsa", &[1, 0, 1], &small_modulus])),
                "the RSA key has 768 bits; at least 1024 are required".to_owned(),
            ),
            (
                &format!("ssh-rsa {}", wire(&[b"ssh-rsa", &[1, 0, 1], &[0x80; 200]])),
                "the key data is not a valid ssh-rsa key".to_owned(),
            ),
            (
                &format!(
                    "ecdsa-sha2-nistp256 {}",
                    wire(&[b"ecdsa-sha2-nistp256", b"nistp384", &[4; 65]])
                ),
                "the key data is not a valid ecdsa-sha2-nistp256 key".to_owned(),
            ),
            (
                &format!("ssh-ed25519 {}", wire(&[b"\xff\xfe"])),
                "the key data is not a valid ssh-ed25519 key".to_owned(),
            ),
            (
                &format!("{ED25519}\n{RSA}"),
                "must be a single line".to_owned(),
            ),
        ];
        for (line, want) in cases {
            assert_eq!(parse_public_key(line).unwrap_err(), want, "{line}");
        }
    }

    #[test]
    fn counts_mpint_bits() {
        assert_eq!(mpint_bits(&[]), 0);
        assert_eq!(mpint_bits(&[0, 0]), 0);
        assert_eq!(mpint_bits(&[1, 0, 1]), 17);
        assert_eq!(mpint_bits(&[0, 0x80]), 8);
        assert_eq!(mpint_bits(&[0x80]), 0, "negative");
    }
}
