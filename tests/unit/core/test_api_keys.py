from __future__ import annotations

import base64

from gateway_core.api_keys import (
    cache_digest,
    generate_key,
    is_well_formed_key,
    is_well_formed_prefix,
    prefix_of,
)


class TestKeyFormat:
    def test_generated_key_is_nz_and_43_urlsafe_chars_of_32_random_bytes(self) -> None:
        key = generate_key()
        assert len(key.secret) == 46 and key.secret.startswith("nz_")
        assert len(base64.urlsafe_b64decode(key.secret[3:] + "=")) == 32
        assert is_well_formed_key(key.secret)

    def test_prefix_is_first_twelve_characters(self) -> None:
        key = generate_key()
        assert key.prefix == key.secret[:12] == prefix_of(key.secret)
        assert is_well_formed_prefix(key.prefix)

    def test_keys_do_not_repeat(self) -> None:
        assert len({generate_key().secret for _ in range(500)}) == 500

    def test_malformed_keys_and_prefixes_are_rejected(self) -> None:
        good = generate_key().secret
        for bad in ["", "nz_", good[:-1], good + "A", "sk_" + good[3:], good[:20] + "!" + good[21:]]:
            assert not is_well_formed_key(bad)
        for bad in ["nz_abc", "nz_abcdefghij", "xx_abcdefghi", "nz_abc$efghi"]:
            assert not is_well_formed_prefix(bad)

    def test_cache_digest_depends_on_the_whole_key_not_the_prefix(self) -> None:
        key = generate_key().secret
        sibling = key[:12] + ("A" if key[12] != "A" else "B") + key[13:]
        assert cache_digest(key) != cache_digest(sibling)
        assert key not in cache_digest(key) and key[:12] not in cache_digest(key)
