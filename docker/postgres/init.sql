-- Runs once, when the postgres service initialises an empty data volume (as POSTGRES_USER, in
-- database POSTGRES_DB = mlflow): the second database, for Optuna's RDB storage.
CREATE DATABASE optuna;
