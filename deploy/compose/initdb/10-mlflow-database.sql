-- Run once by the official postgres image on an empty data directory (/docker-entrypoint-initdb.d).
-- POSTGRES_DB (optuna) holds the Optuna study; MLflow gets its own database because both keep an
-- `alembic_version` table.
CREATE DATABASE mlflow;
