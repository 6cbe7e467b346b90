-- Solidus + Ahoy test schema (DDL subset) for the replication integration tests.
--
-- Followed: Solidus v4.7.0 (tag commit 4026945d614e81383c007ed1ab1278a0195ce5d9,
-- core/lib/spree/core/version.rb VERSION = "4.7.0"). Read at that tag:
--   core/db/migrate/20160101010000_solidus_one_four.rb   (ActiveRecord::Migration[5.0];
--       the squashed schema: spree_products, spree_variants, spree_stock_locations,
--       spree_stock_items, spree_stock_movements, spree_shipping_categories)
--   every later migration under core/db/migrate, promotions/db/migrate and
--   legacy_promotions/db/migrate, searched for these tables; the ones that touch them:
--       20201008213609_add_discontinue_on_to_spree_products.rb        ([5.2])
--       20221123152807_add_shipping_category_to_spree_variants.rb     ([5.2] add_reference)
--       20250201172950_add_gtin_and_condition_to_spree_variant.rb     ([7.0])
--       20250207104016_add_primary_taxon_to_products.rb               ([7.0])
--       20250508145917_add_email_to_stock_locations.rb                ([7.0])
--       20250605105424_add_shipping_category_foreign_keys.rb          ([7.0])
--   core/app/models/spree/variant.rb, stock_item.rb (validations, soft delete)
-- Ahoy: ankane/ahoy v5.5.0 (commit 0934ed94a4a7263f682eefb47bd78cdc05d33c5d),
--   lib/generators/ahoy/templates/active_record_migration.rb.tt and
--   lib/generators/ahoy/activerecord_generator.rb (PostgreSQL -> properties jsonb; no
--   primary_key_type configured -> bigint keys). Ahoy is not part of Solidus; stores add
--   it themselves, and the migration is generated with the app's Rails version (7.x/8.x).
--
-- How Rails renders these migrations on PostgreSQL:
--   * Migration[5.0] create_table -> "id serial PRIMARY KEY" (integer). Tables generated
--     by a Rails >= 5.1 migration (ahoy_events) get "bigserial".
--   * t.string -> varchar without length; t.datetime -> timestamp without time zone,
--     timestamp(6) where precision: 6 is given or the migration is [7.0]+;
--     t.decimal precision/scale -> numeric(p,s). Defaults ARE written to the database
--     (DEFAULT '' / 0 / true / false), unlike Django and Odoo.
--   * add_reference (Migration[5.1]+) -> bigint + index; no FK unless foreign_key: true.
--   * add_foreign_key -> ON DELETE NO ACTION, not deferrable, named fk_rails_<hash>
--     (readable names below). The `null: false` option that Solidus passes to
--     add_foreign_key is not a column option: shipping_category_id stays NULL-able.
--
-- Notable facts:
--   * There is NO database FK between spree_variants.product_id and spree_products,
--     spree_stock_items.variant_id / stock_location_id, or spree_stock_movements.
--     stock_item_id: those relations exist only in ActiveRecord.
--   * Soft delete: spree_products, spree_variants and spree_stock_items carry deleted_at
--     (Spree::SoftDeletable / discard). Discarding a variant discards its stock items
--     (an UPDATE of deleted_at, not a DELETE).
--   * spree_variants.sku is varchar NOT NULL DEFAULT '' with a plain (non-unique)
--     index; uniqueness among non-deleted variants is a model validation only, so
--     several rows may hold '' or a deleted duplicate.
--   * One live stock item per (variant, location): partial unique index
--     WHERE deleted_at is null.
--   * Quantities are integer: count_on_hand NOT NULL DEFAULT 0; stock movement quantity
--     NULL-able DEFAULT 0. count_on_hand may go negative for backorderable items.
--
-- Columns omitted (NULL-able): spree_products.primary_taxon_id (integer, FK to
-- spree_taxons, ON DELETE NO ACTION, with index_spree_products_on_primary_taxon_id).
-- Everything else on these tables is kept. Not included: ahoy_visits (ahoy_events has
-- no FK to it), spree_prices, spree_inventory_units, spree_stock_transfers, etc.

BEGIN;

CREATE TABLE spree_shipping_categories (
    id         serial PRIMARY KEY,
    name       varchar,
    created_at timestamp(6) without time zone,
    updated_at timestamp(6) without time zone
);

CREATE TABLE spree_products (
    id                   serial PRIMARY KEY,
    name                 varchar DEFAULT '' NOT NULL,
    description          text,
    available_on         timestamp without time zone,
    deleted_at           timestamp without time zone,
    slug                 varchar,
    meta_description     text,
    meta_keywords        varchar,
    tax_category_id      integer,
    shipping_category_id integer,
    created_at           timestamp(6) without time zone,
    updated_at           timestamp(6) without time zone,
    promotionable        boolean DEFAULT true,
    meta_title           varchar,
    discontinue_on       timestamp without time zone
);
CREATE INDEX index_spree_products_on_available_on ON spree_products (available_on);
CREATE INDEX index_spree_products_on_deleted_at   ON spree_products (deleted_at);
CREATE INDEX index_spree_products_on_name         ON spree_products (name);
CREATE UNIQUE INDEX index_spree_products_on_slug  ON spree_products (slug);
ALTER TABLE spree_products
    ADD CONSTRAINT fk_rails_spree_products_shipping_category
        FOREIGN KEY (shipping_category_id) REFERENCES spree_shipping_categories (id);

CREATE TABLE spree_variants (
    id                   serial PRIMARY KEY,
    sku                  varchar DEFAULT '' NOT NULL,
    weight               numeric(8,2) DEFAULT 0.0,
    height               numeric(8,2),
    width                numeric(8,2),
    depth                numeric(8,2),
    deleted_at           timestamp without time zone,
    is_master            boolean DEFAULT false,
    product_id           integer,                     -- no DB foreign key
    cost_price           numeric(10,2),
    position             integer,
    cost_currency        varchar,
    track_inventory      boolean DEFAULT true,
    tax_category_id      integer,
    updated_at           timestamp(6) without time zone,
    created_at           timestamp(6) without time zone,
    shipping_category_id bigint,                      -- add_reference, no DB foreign key
    gtin                 varchar,
    condition            varchar
);
CREATE INDEX index_spree_variants_on_position             ON spree_variants (position);
CREATE INDEX index_spree_variants_on_product_id           ON spree_variants (product_id);
CREATE INDEX index_spree_variants_on_sku                  ON spree_variants (sku);
CREATE INDEX index_spree_variants_on_tax_category_id      ON spree_variants (tax_category_id);
CREATE INDEX index_spree_variants_on_track_inventory      ON spree_variants (track_inventory);
CREATE INDEX index_spree_variants_on_shipping_category_id ON spree_variants (shipping_category_id);

CREATE TABLE spree_stock_locations (
    id                      serial PRIMARY KEY,
    name                    varchar,
    created_at              timestamp(6) without time zone,
    updated_at              timestamp(6) without time zone,
    "default"               boolean DEFAULT false NOT NULL,
    address1                varchar,
    address2                varchar,
    city                    varchar,
    state_id                integer,
    state_name              varchar,
    country_id              integer,
    zipcode                 varchar,
    phone                   varchar,
    active                  boolean DEFAULT true,
    backorderable_default   boolean DEFAULT false,
    propagate_all_variants  boolean DEFAULT true,
    admin_name              varchar,
    position                integer DEFAULT 0,
    restock_inventory       boolean DEFAULT true NOT NULL,
    fulfillable             boolean DEFAULT true NOT NULL,
    code                    varchar,
    check_stock_on_transfer boolean DEFAULT true,
    email                   varchar
);
CREATE INDEX index_spree_stock_locations_on_country_id ON spree_stock_locations (country_id);
CREATE INDEX index_spree_stock_locations_on_state_id   ON spree_stock_locations (state_id);

CREATE TABLE spree_stock_items (
    id                serial PRIMARY KEY,
    stock_location_id integer,                        -- no DB foreign key
    variant_id        integer,                        -- no DB foreign key
    count_on_hand     integer DEFAULT 0 NOT NULL,
    created_at        timestamp(6) without time zone,
    updated_at        timestamp(6) without time zone,
    backorderable     boolean DEFAULT false,
    deleted_at        timestamp without time zone
);
CREATE INDEX index_spree_stock_items_on_deleted_at        ON spree_stock_items (deleted_at);
CREATE INDEX stock_item_by_loc_and_var_id                 ON spree_stock_items (stock_location_id, variant_id);
CREATE INDEX index_spree_stock_items_on_stock_location_id ON spree_stock_items (stock_location_id);
CREATE UNIQUE INDEX index_spree_stock_items_on_variant_id_and_stock_location_id
    ON spree_stock_items (variant_id, stock_location_id) WHERE deleted_at is null;

CREATE TABLE spree_stock_movements (
    id              serial PRIMARY KEY,
    stock_item_id   integer,                          -- no DB foreign key
    quantity        integer DEFAULT 0,
    action          varchar,
    created_at      timestamp(6) without time zone NOT NULL,
    updated_at      timestamp(6) without time zone NOT NULL,
    originator_type varchar,                          -- polymorphic (e.g. 'Spree::Shipment')
    originator_id   integer
);
CREATE INDEX index_spree_stock_movements_on_stock_item_id ON spree_stock_movements (stock_item_id);

-- Ahoy (generated migration, PostgreSQL, default key type)
CREATE TABLE ahoy_events (
    id         bigserial PRIMARY KEY,
    visit_id   bigint,                                -- t.references, no DB foreign key
    user_id    bigint,                                -- t.references, no DB foreign key
    name       varchar,
    properties jsonb,
    time       timestamp(6) without time zone
);
CREATE INDEX index_ahoy_events_on_visit_id      ON ahoy_events (visit_id);
CREATE INDEX index_ahoy_events_on_user_id       ON ahoy_events (user_id);
CREATE INDEX index_ahoy_events_on_name_and_time ON ahoy_events (name, time);
CREATE INDEX index_ahoy_events_on_properties    ON ahoy_events USING gin (properties jsonb_path_ops);

COMMIT;

-- Intended skusync mapping (TOML). The lookup form for `sku` / `location` is the
-- planned one (README: "lookups through a variant table ... not built yet"); read
-- { from = T, on = C, column = X } as: take T.X from the T row whose primary key equals
-- this stock row's column C.
--
-- [[inventory]]
-- table    = "public.spree_stock_items"
-- sku      = { from = "public.spree_variants", on = "variant_id", column = "sku" }
-- location = { from = "public.spree_stock_locations", on = "stock_location_id", column = "code" }
-- on_hand  = "count_on_hand"
-- where    = ["deleted_at IS NULL"]
-- # Solidus has no reserved column: when an order completes, Order#finalize ->
-- # Shipment#finalize! -> InventoryUnitsFinalizer unstocks the pending inventory units,
-- # writing spree_stock_movements rows and lowering count_on_hand.
--
-- [[activity]]
-- table   = "public.ahoy_events"
-- kind    = "name"
-- time    = "time"
-- user    = "user_id"
-- sku     = ???   # ahoy_events has no SKU column; a store that tracks one puts it in
--                 # properties (e.g. properties->>'sku'), which `sku = "<column>"`
--                 # cannot address today.
-- windows = ["5m", "1h"]
-- [activity.counters]
-- "Viewed product" = "views"
--
-- Cases worth testing: a variant soft-deleted (variants.deleted_at set, then its stock
-- items' deleted_at set in a later statement), sku '' on several variants (master
-- variants often), a sku edit on spree_variants, stock_location.code NULL, a stock item
-- re-created for the same (variant, location) after the old one was soft-deleted
-- (allowed by the partial unique index), and track_inventory = false living on the
-- variant rather than the stock item.
