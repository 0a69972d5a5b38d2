from tests.support.vaultenv import VaultEnv


def test_approle_login_and_policy_denies_write(vault_env2: VaultEnv) -> None:
    import hvac
    import pytest

    c = hvac.Client(url=vault_env2.address)
    c.auth.approle.login(vault_env2.role_id, vault_env2.secret_id_file.read_text())
    assert c.is_authenticated()
    with pytest.raises(hvac.exceptions.Forbidden):
        c.secrets.kv.v2.create_or_update_secret(
            f"bootkey/{vault_env2.host_id}/x", secret={"a": "b"}, mount_point="secret")
