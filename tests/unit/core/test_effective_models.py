from __future__ import annotations

from gateway_core.effective_models import EffectiveModels, canonical, is_cloud

DISCOVERED = ["llama3.1:latest", "llama3.1:8b", "qwen3:8b", "gpt-oss:20b-cloud", "kimi:cloud"]


class TestEffectiveModels:
    def test_effective_set_is_allowlist_intersected_with_discovered(self) -> None:
        eff = EffectiveModels.resolve(["llama3.1:8b", "mistral:7b"], False, DISCOVERED)
        assert eff.names() == ["llama3.1:8b"]
        assert eff.lookup("mistral:7b") is None

    def test_a_bare_name_means_latest_and_matching_ignores_case(self) -> None:
        eff = EffectiveModels.resolve(["LLAMA3.1"], False, DISCOVERED)
        assert eff.lookup("llama3.1") == "llama3.1:latest"
        assert eff.lookup("llama3.1:latest") == "llama3.1:latest"
        assert eff.lookup("llama3.1:8b") is None
        assert canonical("user/model") == "user/model:latest"

    def test_allow_all_takes_every_discovered_model_except_cloud_ones(self) -> None:
        eff = EffectiveModels.resolve([], True, DISCOVERED)
        assert eff.names() == ["llama3.1:8b", "llama3.1:latest", "qwen3:8b"]

    def test_cloud_models_resolve_only_when_named(self) -> None:
        assert is_cloud("gpt-oss:20b-cloud") and is_cloud("kimi:cloud") and not is_cloud("qwen3:8b")
        eff = EffectiveModels.resolve(["kimi:cloud"], True, DISCOVERED)
        assert eff.lookup("kimi:cloud") == "kimi:cloud"
        assert eff.lookup("gpt-oss:20b-cloud") is None

    def test_empty_discovery_resolves_nothing(self) -> None:
        assert EffectiveModels.resolve(["qwen3:8b"], True, []).names() == []
