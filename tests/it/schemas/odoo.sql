-- Odoo test schema (DDL subset) for the replication integration tests.
--
-- Followed: Odoo 17.0 Community (odoo/release.py: version_info (17, 0, 0, FINAL)), with
-- the modules base + uom + product + stock installed. The official odoo/odoo repository
-- is too large to mirror here, so the 17.0 sources were read from an unmodified vendored
-- copy of the 17.0 tree (GitHub UmmeHani-SCI/Odoo17-UH_Hospital_Management at commit
-- 11256605ab55a32f703c625d4e3e29eae2968289, before that project's own edits, which only
-- touch unlink() calls). The ORM type mapping was cross-checked against odoo/odoo
-- copies in the code index. Files read:
--   odoo/fields.py (column_type of Float, Char, Text, Selection, Many2one, Boolean,
--       Datetime, Date; Many2one ondelete defaults), odoo/models.py (_auto_init,
--       create_model_table, magic columns, _sql_constraints), odoo/tools/sql.py
--       (create_model_table, add_foreign_key, create_index, make_index_name),
--       odoo/modules/registry.py (check_indexes)
--   addons/stock/models/stock_quant.py, stock_location.py, product.py (stock's
--       extensions of product.template / product.category)
--   addons/product/models/product_product.py, product_template.py, product_category.py
--   addons/uom/models/uom_uom.py
--
-- How Odoo builds these tables (no migration files: the ORM creates/updates the schema
-- from the field definitions when a module is installed or upgraded):
--   * id is "SERIAL NOT NULL" + PRIMARY KEY(id).
--   * required=True -> NOT NULL. Field defaults (default=..., default=True, now) are
--     applied by the ORM, never as a DB DEFAULT. So `active`, `quantity` etc. are NULL
--     unless the writer sets them.
--   * fields.Float: "numeric" (no precision/scale) when `digits` is given at all (a
--     tuple, 0, or a decimal.precision name such as 'Product Unit of Measure');
--     "double precision" only when digits is absent. stock_quant.quantity and
--     reserved_quantity have digits='Product Unit of Measure' -> numeric. The ORM rounds
--     values to that precision before writing, but the column itself is unconstrained.
--   * fields.Char -> varchar (no length; `size` unused here); translate=True -> jsonb
--     (since 16.0: {"en_US": "...", "fr_FR": "..."}). product_template.name and
--     uom_uom.name are jsonb; stock_location.name and product_category.name are varchar.
--   * fields.Selection -> varchar. Datetime -> timestamp without time zone (UTC).
--   * Many2one -> int4 with a REAL database FK and ON DELETE: `ondelete` as declared,
--     else RESTRICT when required and SET NULL when not. Unlike Django/Rails, Odoo's
--     cascades happen in PostgreSQL (e.g. deleting a product_template deletes its
--     product_product rows in the DB, without row-level ORM events).
--   * index=True -> "<table>__<column>_index" btree; index='btree_not_null' -> partial
--     btree WHERE col IS NOT NULL; index='trigram' needs pg_trgm and is omitted here
--     (product_template.name, product_category.name).
--   * _sql_constraints become "<table>_<key>" constraints.
--
-- Columns omitted (all NULL-able):
--   every table: create_uid, write_uid (FK res_users); create_date/write_date are kept.
--   uom_category: none besides the above.
--   uom_uom: none besides the above.
--   product_category: removal_strategy_id (FK product_removal), packaging_reserve_method,
--       product_properties_definition.
--   product_template: description, description_purchase, description_sale,
--       description_picking, description_pickingout, description_pickingin (jsonb),
--       product_properties, message_main_attachment_id, and columns added by modules
--       other than product/stock (sale, purchase, account, ...).
--   product_product: image/attachment-backed fields have no column; none else omitted.
--   stock_location: comment (text), removal_strategy_id, warehouse_id, storage_category_id.
--   stock_quant: storage_category_id, user_id.
-- Kept without their FK constraint, because the target table is not part of this subset
-- (Odoo declares these FKs with ON DELETE SET NULL / RESTRICT as noted per column):
--   company_id (res_company) on product_template, stock_location, stock_quant;
--   stock_quant.lot_id (stock_lot), package_id (stock_quant_package), owner_id (res_partner).
-- Real NOT NULL foreign keys are kept with their targets (uom_uom, uom_category,
-- product_category), because a product_template row cannot exist without them.

BEGIN;

CREATE TABLE uom_category (
    id          SERIAL NOT NULL,
    name        jsonb NOT NULL,
    create_date timestamp,
    write_date  timestamp,
    PRIMARY KEY (id)
);

CREATE TABLE uom_uom (
    id          SERIAL NOT NULL,
    name        jsonb NOT NULL,
    category_id int4 NOT NULL REFERENCES uom_category (id) ON DELETE RESTRICT,
    factor      numeric NOT NULL,                    -- digits=0: NUMERIC, unlimited
    rounding    numeric NOT NULL,
    active      bool,
    uom_type    varchar NOT NULL,                    -- 'bigger' | 'reference' | 'smaller'
    create_date timestamp,
    write_date  timestamp,
    PRIMARY KEY (id),
    CONSTRAINT uom_uom_factor_gt_zero CHECK (factor != 0),
    CONSTRAINT uom_uom_rounding_gt_zero CHECK (rounding > 0),
    CONSTRAINT uom_uom_factor_reference_is_one
        CHECK ((uom_type = 'reference' AND factor = 1.0) OR (uom_type != 'reference'))
);

CREATE TABLE product_category (
    id            SERIAL NOT NULL,
    name          varchar NOT NULL,
    complete_name varchar,
    parent_id     int4 REFERENCES product_category (id) ON DELETE CASCADE,
    parent_path   varchar,
    create_date   timestamp,
    write_date    timestamp,
    PRIMARY KEY (id)
);
CREATE INDEX product_category__parent_id_index   ON product_category USING btree (parent_id);
CREATE INDEX product_category__parent_path_index ON product_category USING btree (parent_path);

CREATE TABLE product_template (
    id                          SERIAL NOT NULL,
    name                        jsonb NOT NULL,      -- translated Char (16.0+)
    sequence                    int4,
    detailed_type               varchar NOT NULL,    -- 'consu' | 'service' | 'product' (stock)
    type                        varchar,             -- computed+stored from detailed_type
    categ_id                    int4 NOT NULL REFERENCES product_category (id) ON DELETE RESTRICT,
    list_price                  numeric,             -- digits='Product Price'
    volume                      numeric,             -- digits='Volume'
    weight                      numeric,             -- digits='Stock Weight'
    sale_ok                     bool,
    purchase_ok                 bool,
    uom_id                      int4 NOT NULL REFERENCES uom_uom (id) ON DELETE RESTRICT,
    uom_po_id                   int4 NOT NULL REFERENCES uom_uom (id) ON DELETE RESTRICT,
    company_id                  int4,                -- Odoo: FK res_company ON DELETE SET NULL
    active                      bool,
    color                       int4,
    default_code                varchar,             -- computed+stored from the variant
    priority                    varchar,             -- '0' | '1'
    can_image_1024_be_zoomed    bool,
    has_configurable_attributes bool,
    tracking                    varchar NOT NULL,    -- stock: 'serial' | 'lot' | 'none'
    sale_delay                  int4,                -- stock
    create_date                 timestamp,
    write_date                  timestamp,
    PRIMARY KEY (id)
);
CREATE INDEX product_template__company_id_index ON product_template USING btree (company_id);

CREATE TABLE product_product (
    id                               SERIAL NOT NULL,
    default_code                     varchar,        -- "Internal Reference": the usual SKU
    active                           bool,
    product_tmpl_id                  int4 NOT NULL REFERENCES product_template (id) ON DELETE CASCADE,
    barcode                          varchar,        -- no unique constraint in 17.0 (checked in Python)
    combination_indices              varchar,
    volume                           numeric,
    weight                           numeric,
    can_image_variant_1024_be_zoomed bool,
    create_date                      timestamp,
    write_date                       timestamp,
    PRIMARY KEY (id)
);
CREATE INDEX product_product__default_code_index        ON product_product USING btree (default_code);
CREATE INDEX product_product__product_tmpl_id_index     ON product_product USING btree (product_tmpl_id);
CREATE INDEX product_product__barcode_index             ON product_product USING btree (barcode) WHERE barcode IS NOT NULL;
CREATE INDEX product_product__combination_indices_index ON product_product USING btree (combination_indices);
-- created by ProductProduct.init()
CREATE UNIQUE INDEX product_product_combination_unique
    ON product_product (product_tmpl_id, combination_indices) WHERE active is true;

CREATE TABLE stock_location (
    id                         SERIAL NOT NULL,
    name                       varchar NOT NULL,
    complete_name              varchar,              -- e.g. 'WH/Stock/Shelf 1'
    active                     bool,
    usage                      varchar NOT NULL,     -- supplier|view|internal|customer|inventory|production|transit
    location_id                int4 REFERENCES stock_location (id) ON DELETE CASCADE,
    posx                       int4,
    posy                       int4,
    posz                       int4,
    parent_path                varchar,
    company_id                 int4,                 -- Odoo: FK res_company ON DELETE SET NULL
    scrap_location             bool,
    return_location            bool,
    replenish_location         bool,
    barcode                    varchar,
    cyclic_inventory_frequency int4,
    last_inventory_date        date,
    next_inventory_date        date,
    create_date                timestamp,
    write_date                 timestamp,
    PRIMARY KEY (id),
    CONSTRAINT stock_location_barcode_company_uniq UNIQUE (barcode, company_id),
    CONSTRAINT stock_location_inventory_freq_nonneg CHECK (cyclic_inventory_frequency >= 0)
);
CREATE INDEX stock_location__usage_index       ON stock_location USING btree (usage);
CREATE INDEX stock_location__location_id_index ON stock_location USING btree (location_id);
CREATE INDEX stock_location__parent_path_index ON stock_location USING btree (parent_path);
CREATE INDEX stock_location__company_id_index  ON stock_location USING btree (company_id);

CREATE TABLE stock_quant (
    id                      SERIAL NOT NULL,
    product_id              int4 NOT NULL REFERENCES product_product (id) ON DELETE RESTRICT,
    company_id              int4,                    -- related location_id.company_id, stored
    location_id             int4 NOT NULL REFERENCES stock_location (id) ON DELETE RESTRICT,
    lot_id                  int4,                    -- Odoo: FK stock_lot ON DELETE RESTRICT
    package_id              int4,                    -- Odoo: FK stock_quant_package ON DELETE RESTRICT
    owner_id                int4,                    -- Odoo: FK res_partner ON DELETE SET NULL
    quantity                numeric,                 -- NOT required: may be NULL
    reserved_quantity       numeric NOT NULL,
    in_date                 timestamp NOT NULL,
    inventory_quantity      numeric,
    inventory_diff_quantity numeric,
    inventory_date          date,
    inventory_quantity_set  bool,
    create_date             timestamp,
    write_date              timestamp,
    PRIMARY KEY (id)
);
CREATE INDEX stock_quant__product_id_index  ON stock_quant USING btree (product_id);
CREATE INDEX stock_quant__location_id_index ON stock_quant USING btree (location_id);
CREATE INDEX stock_quant__lot_id_index      ON stock_quant USING btree (lot_id);
CREATE INDEX stock_quant__package_id_index  ON stock_quant USING btree (package_id);
CREATE INDEX stock_quant__owner_id_index    ON stock_quant USING btree (owner_id) WHERE owner_id IS NOT NULL;
-- No unique constraint on (product, location, lot, package, owner): Odoo merges
-- duplicate quants later (_merge_quants), so several rows per key are normal.

COMMIT;

-- Intended skusync mapping (TOML). The lookup form for `sku` / `location` is the
-- planned one (README: "lookups through a variant table ... not built yet"); read
-- { from = T, on = C, column = X } as: take T.X from the T row whose primary key equals
-- this stock row's column C.
--
-- [[inventory]]
-- table    = "public.stock_quant"
-- sku      = { from = "public.product_product", on = "product_id", column = "default_code" }
-- location = { from = "public.stock_location", on = "location_id", column = "complete_name" }
-- on_hand  = "quantity"
-- reserved = "reserved_quantity"
-- scale    = 3   # at least the database's 'Product Unit of Measure' precision
--
-- Caveats the tests should cover: quantity and reserved_quantity are numeric with
-- fractional values; quantity may be NULL; default_code may be NULL or shared by
-- several variants; quants also exist in virtual locations (usage 'supplier',
-- 'customer', 'inventory', 'production', 'transit'), where they are usually negative,
-- and only usage = 'internal' is on-hand stock. That filter lives on stock_location,
-- so a `where` on stock_quant cannot express it; it needs a filter evaluated on the
-- looked-up row (no such syntax exists yet). Deleting a product_template
-- cascades to product_product in the database, and stock_quant RESTRICTs it.
