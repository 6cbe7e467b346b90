-- What skusync reads: stock rows in full, activity rows as inserts only.
CREATE PUBLICATION skusync FOR TABLE inventory;
CREATE PUBLICATION skusync_activity FOR TABLE activity_log WITH (publish = 'insert');
