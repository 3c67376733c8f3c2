"""The client address behind trusted proxies (SPEC §4.11): headers count only from a trusted peer,
and then only the right-most address that is not itself a trusted proxy."""

from __future__ import annotations

import pytest

from adapters.http.client_address import TrustedProxies, client_address
from entrypoints.settings import SettingsError, _cidrs

LB = TrustedProxies.parse("10.0.0.0/8, 2001:db8:ffff::/48")


def addr(peer: str | None, xff: list[str] | None = None, fwd: list[str] | None = None,
         trusted: TrustedProxies = LB) -> str:
    return client_address(peer, xff or [], fwd or [], trusted)


class TestUntrustedPeers:
    def test_without_trusted_proxies_the_headers_are_ignored(self) -> None:
        got = addr("203.0.113.9", ["198.51.100.1"], ["for=198.51.100.2"], TrustedProxies())
        assert got == "203.0.113.9"

    def test_a_peer_outside_the_list_cannot_name_another_client(self) -> None:
        assert addr("203.0.113.9", ["198.51.100.1"]) == "203.0.113.9"
        assert addr("203.0.113.9", fwd=['for="[2001:db8::1]"']) == "203.0.113.9"

    def test_no_peer_means_no_address(self) -> None:
        assert addr(None, ["198.51.100.1"]) == ""


class TestXForwardedFor:
    def test_the_address_the_proxy_saw_is_the_client(self) -> None:
        assert addr("10.1.2.3", ["198.51.100.7"]) == "198.51.100.7"

    def test_addresses_a_caller_prepends_do_not_count(self) -> None:
        # The caller sent "X-Forwarded-For: 1.1.1.1"; the proxy appended what it saw.
        assert addr("10.1.2.3", ["1.1.1.1, 198.51.100.7"]) == "198.51.100.7"

    def test_a_chain_of_trusted_proxies_is_walked_from_the_right(self) -> None:
        assert addr("10.0.0.1", ["6.6.6.6, 198.51.100.7, 10.9.9.9, 10.8.8.8"]) == "198.51.100.7"

    def test_several_header_lines_form_one_list_in_order(self) -> None:
        assert addr("10.0.0.1", ["6.6.6.6", "198.51.100.7, 10.2.2.2"]) == "198.51.100.7"
        assert addr("10.0.0.1", ["198.51.100.7", "10.2.2.2"]) == "198.51.100.7"

    def test_only_trusted_hops_give_the_farthest_one(self) -> None:
        assert addr("10.0.0.1", ["10.3.3.3, 10.2.2.2"]) == "10.3.3.3"

    def test_ipv6_with_and_without_brackets_and_ports(self) -> None:
        assert addr("10.0.0.1", ["2001:db8::7"]) == "2001:db8::7"
        assert addr("10.0.0.1", ["[2001:db8::7]:4711"]) == "2001:db8::7"
        assert addr("10.0.0.1", ["[2001:DB8:0::7]"]) == "2001:db8::7"
        assert addr("2001:db8:ffff::1", ["198.51.100.7"]) == "198.51.100.7"

    def test_an_ipv4_address_with_a_port(self) -> None:
        assert addr("10.0.0.1", ["198.51.100.7:55123"]) == "198.51.100.7"

    def test_ipv4_mapped_addresses_are_plain_ipv4(self) -> None:
        assert addr("::ffff:10.0.0.1", ["::ffff:198.51.100.7"]) == "198.51.100.7"

    @pytest.mark.parametrize("garbage", ["unknown", "", " , ", "300.1.1.1", "nz_secret", "[::1", "[::1]x",
                                         "1.2.3.4:5:6:7:8:9:1:2:3", "<script>"])
    def test_garbage_stops_at_the_nearest_trusted_proxy(self, garbage: str) -> None:
        # Never looser: an unreadable hop is charged to the proxy, not to an address left of it.
        assert addr("10.0.0.1", [f"6.6.6.6, {garbage}"]) in ("10.0.0.1", "6.6.6.6")
        assert addr("10.0.0.1", [f"6.6.6.6, {garbage}, 10.2.2.2"]) in ("10.2.2.2", "6.6.6.6")
        assert addr("10.0.0.1", [f"{garbage}"]) == "10.0.0.1"

    def test_an_unreadable_hop_hides_what_lies_left_of_it(self) -> None:
        assert addr("10.0.0.1", ["198.51.100.7, unknown"]) == "10.0.0.1"
        assert addr("10.0.0.1", ["198.51.100.7, unknown, 10.2.2.2"]) == "10.2.2.2"

    def test_x_forwarded_for_wins_over_forwarded(self) -> None:
        assert addr("10.0.0.1", ["198.51.100.7"], ["for=198.51.100.8"]) == "198.51.100.7"


class TestForwarded:
    def test_the_for_parameter_names_the_client(self) -> None:
        assert addr("10.0.0.1", fwd=["for=198.51.100.7;proto=https;by=10.0.0.1"]) == "198.51.100.7"

    def test_quoted_and_bracketed_ipv6_with_port(self) -> None:
        assert addr("10.0.0.1", fwd=['for="[2001:db8:cafe::17]:4711"']) == "2001:db8:cafe::17"

    def test_elements_and_header_lines_are_read_from_the_right(self) -> None:
        value = 'for=6.6.6.6, for="198.51.100.7:80";proto=http, For=10.4.4.4'
        assert addr("10.0.0.1", fwd=[value]) == "198.51.100.7"
        assert addr("10.0.0.1", fwd=["for=6.6.6.6", "for=198.51.100.7, for=10.4.4.4"]) == "198.51.100.7"

    def test_commas_and_semicolons_inside_quotes_do_not_split(self) -> None:
        assert addr("10.0.0.1", fwd=['for=198.51.100.7;ext="a,b;c=\\"d"']) == "198.51.100.7"

    def test_obfuscated_unknown_or_missing_for_stops_at_the_proxy(self) -> None:
        assert addr("10.0.0.1", fwd=["for=198.51.100.7, for=_hidden"]) == "10.0.0.1"
        assert addr("10.0.0.1", fwd=["for=198.51.100.7, for=unknown"]) == "10.0.0.1"
        assert addr("10.0.0.1", fwd=["for=198.51.100.7, proto=https"]) == "10.0.0.1"
        assert addr("10.0.0.1", fwd=['for="198.51.100.7']) == "10.0.0.1"


class TestSetting:
    def test_a_list_of_blocks_and_single_addresses(self) -> None:
        parsed = _cidrs("TRUSTED_PROXIES", "10.0.0.0/8, 192.168.1.7 ,2001:db8::/32,")
        assert [str(n) for n in parsed.networks] == ["10.0.0.0/8", "192.168.1.7/32", "2001:db8::/32"]
        assert not _cidrs("TRUSTED_PROXIES", "")

    @pytest.mark.parametrize("bad", ["10.0.0.0/33", "example.org", "10.0.0.0/8;", "*"])
    def test_a_bad_entry_is_one_line_naming_the_setting(self, bad: str) -> None:
        with pytest.raises(SettingsError) as caught:
            _cidrs("TRUSTED_PROXIES", f"10.0.0.0/8,{bad}")
        message = str(caught.value)
        assert message.startswith("invalid setting TRUSTED_PROXIES:") and "\n" not in message
        assert repr(bad.strip()) in message
