-- Run once by the timescaledb image's entrypoint, when the data volume is empty.
-- POSTGRES_DB already created `edgefleet` (and the image's own init script enabled the
-- timescaledb extension in it); this creates what else the stack needs.
CREATE DATABASE mlflow;
CREATE DATABASE airflow;
\connect edgefleet
CREATE EXTENSION IF NOT EXISTS timescaledb;
