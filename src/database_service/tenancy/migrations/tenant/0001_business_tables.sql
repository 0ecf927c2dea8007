-- Per-company business tables (seed: "Level 1: Company Schema Isolation", "Business Data
-- Management"). Runs with search_path = {{schema}}; owned by the service's owner role and granted
-- to the tenant's role {{role}} by default privileges set when the schema was created.

CREATE TABLE users (
    user_id             varchar(50) PRIMARY KEY,
    email               varchar(255) UNIQUE NOT NULL,
    subscription_tier   varchar(20) NOT NULL CHECK (subscription_tier IN ('free', 'pro', 'enterprise')),
    subscription_limits jsonb,
    created_at          timestamptz DEFAULT now(),
    updated_at          timestamptz DEFAULT now()
);

CREATE TABLE mt5_accounts (
    account_id     bigint PRIMARY KEY,
    user_id        varchar(50) REFERENCES users (user_id),
    account_number varchar(50) NOT NULL,
    broker         varchar(100),
    account_type   varchar(20) CHECK (account_type IN ('demo', 'live')),
    balance        numeric(15, 2),
    equity         numeric(15, 2),
    margin         numeric(15, 2),
    status         varchar(20) DEFAULT 'active',
    created_at     timestamptz DEFAULT now()
);

CREATE TABLE trading_history (
    trade_id    bigserial PRIMARY KEY,
    account_id  bigint REFERENCES mt5_accounts (account_id),
    user_id     varchar(50) REFERENCES users (user_id),
    symbol      varchar(20) NOT NULL,
    side        varchar(4) NOT NULL CHECK (side IN ('buy', 'sell')),
    volume      numeric(12, 2) NOT NULL,
    open_price  numeric(15, 5) NOT NULL,
    close_price numeric(15, 5),
    profit      numeric(15, 2),
    opened_at   timestamptz NOT NULL DEFAULT now(),
    closed_at   timestamptz
);
CREATE INDEX trading_history_user_opened ON trading_history (user_id, opened_at);

-- Seed input contracts: trading signals (trading engine), positions (risk), notification logs.
CREATE TABLE trading_signals (
    signal_id  varchar(64) PRIMARY KEY,
    user_id    varchar(50) REFERENCES users (user_id),
    symbol     varchar(20) NOT NULL,
    action     varchar(10) NOT NULL CHECK (action IN ('buy', 'sell', 'hold')),
    confidence numeric(3, 2),
    payload    jsonb,
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE positions (
    account_id    bigint REFERENCES mt5_accounts (account_id),
    symbol        varchar(20) NOT NULL,
    volume        numeric(12, 2) NOT NULL,
    avg_price     numeric(15, 5) NOT NULL,
    unrealized_pl numeric(15, 2),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (account_id, symbol)
);

CREATE TABLE notification_logs (
    id         bigserial PRIMARY KEY,
    user_id    varchar(50) REFERENCES users (user_id),
    channel    varchar(20) NOT NULL,
    status     varchar(20) NOT NULL,
    message    text,
    created_at timestamptz NOT NULL DEFAULT now()
);
