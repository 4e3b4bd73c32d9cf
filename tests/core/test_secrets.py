"""Passwords in storage and tracking URLs are shown as `***` everywhere."""

from __future__ import annotations

import pytest
import sqlalchemy
import yaml

from pipeline.core import mask_text, mask_url
from pipeline.core._secrets import mask_mapping, url_secrets


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        ("postgresql+psycopg://sweep:s3cret@db:5432/optuna", "postgresql+psycopg://sweep:***@db:5432/optuna"),
        ("postgresql://sweep:s3cret@db/optuna?sslmode=require", "postgresql://sweep:***@db/optuna?sslmode=require"),
        ("mysql+pymysql://root:p%40ss%2Fw@mysql:3306/optuna", "mysql+pymysql://root:***@mysql:3306/optuna"),
        ("http://alice:tok-123@mlflow:5000", "http://alice:***@mlflow:5000"),
        ("https://:onlypw@mlflow.example.org/api", "https://:***@mlflow.example.org/api"),
        (
            "postgresql://db/optuna?user=sweep&password=s3cret&sslmode=require",
            "postgresql://db/optuna?user=sweep&password=***&sslmode=require",
        ),
        ("grpc://proxy:13000", "grpc://proxy:13000"),
        ("grpc://user:pw@proxy:13000", "grpc://user:***@proxy:13000"),
        ("sqlite:////abs/mlruns/optuna.db", "sqlite:////abs/mlruns/optuna.db"),
        ("postgresql://sweep@db/optuna", "postgresql://sweep@db/optuna"),
        ("journal:///mlruns/optuna.journal", "journal:///mlruns/optuna.journal"),
        ("not a url at all", "not a url at all"),
    ],
)
def test_mask_url(url, masked):
    assert mask_url(url) == masked


def test_mask_url_agrees_with_sqlalchemy_hide_password():
    url = "postgresql+psycopg://sweep:s3cret@db:5432/optuna?sslmode=require"
    assert mask_url(url) == sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)


def test_url_secrets_lists_raw_and_decoded_password_longest_first():
    assert url_secrets("mysql://root:p%40ss@h/db") == ["p%40ss", "p@ss"]
    assert url_secrets("postgresql://h/db?password=abc&Token=xyz9") == ["xyz9", "abc"]
    assert url_secrets("sqlite:///x.db") == []


def test_mask_text_scrubs_urls_and_bare_passwords():
    storage = "postgresql+psycopg://sweep:s3cret@db:5432/optuna"
    error = (
        f'connection to server at "db" (10.0.0.5), port 5432 failed: FATAL: password "s3cret" rejected for {storage}'
    )
    assert mask_text(error, [storage, None]) == (
        'connection to server at "db" (10.0.0.5), port 5432 failed: FATAL: password "***" rejected '
        "for postgresql+psycopg://sweep:***@db:5432/optuna"
    )


def test_mask_text_masks_unknown_urls_with_passwords_too():
    text = "tracking http://bob:hunter2@mlflow:5000/#/ and storage sqlite:///a.db"
    assert mask_text(text) == "tracking http://bob:***@mlflow:5000/#/ and storage sqlite:///a.db"


def test_mask_text_on_a_yaml_dump_of_the_study_file():
    storage = "postgresql://sweep:p%40ss@db/optuna"
    dump = yaml.safe_dump(
        {"study": {"name": "tiny", "storage": storage}, "note": "decoded form p@ss also appears"}, sort_keys=True
    )
    masked = mask_text(dump, [storage])
    assert "p@ss" not in masked and "p%40ss" not in masked
    assert yaml.safe_load(masked) == {
        "study": {"name": "tiny", "storage": "postgresql://sweep:***@db/optuna"},
        "note": "decoded form *** also appears",
    }


def test_mask_mapping_masks_string_values_only():
    storage = "postgresql://u:pw1234@db/optuna"
    assert mask_mapping({"sweep.storage": storage, "lr": 0.1, "n": "pw1234x"}, [storage]) == {
        "sweep.storage": "postgresql://u:***@db/optuna",
        "lr": 0.1,
        "n": "***x",
    }
